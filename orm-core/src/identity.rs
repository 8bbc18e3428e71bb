//! The identity map: one object per primary key.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use crate::model::Model;
use crate::tracked::{Block, Tracked};

/// Where an object lives: its block among those the map keeps, and its
/// place in the block.
#[derive(Clone, Copy, Debug)]
struct Slot {
    block: u32,
    index: u32,
}

/// The identity map of one model. An entry is a slot in one of the blocks
/// the map keeps alive, rather than a handle: loading a block of 64 rows
/// takes one reference to the block instead of one per object, entries are
/// half the size, and forgetting them all frees each block once.
///
/// Blocks stay until the map is dropped, so an object removed from the map
/// (deleted, or replaced by a new object for its row) lives as long as its
/// session's state at most.
pub(crate) struct Identities<M: Model> {
    slots: HashMap<M::PrimaryKey, Slot, foldhash::fast::RandomState>,
    blocks: Vec<Block<M>>,
}

impl<M: Model> Default for Identities<M> {
    fn default() -> Self {
        Identities {
            slots: HashMap::default(),
            blocks: Vec::new(),
        }
    }
}

/// A handle to the object in `slot`.
fn handle<M>(blocks: &[Block<M>], slot: Slot) -> Tracked<M> {
    Tracked::in_block(&blocks[slot.block as usize], slot.index)
}

impl<M: Model> Identities<M> {
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The object for `key`.
    pub(crate) fn get(&self, key: &M::PrimaryKey) -> Option<Tracked<M>> {
        self.slots.get(key).map(|&slot| handle(&self.blocks, slot))
    }

    /// Whether `object` is the map's object for `key`.
    pub(crate) fn holds(&self, key: &M::PrimaryKey, object: &Tracked<M>) -> bool {
        self.slots.get(key).is_some_and(|&slot| self.is(slot, object))
    }

    /// The key under which the map holds `object`, found by visiting every
    /// entry.
    pub(crate) fn key_of(&self, object: &Tracked<M>) -> Option<M::PrimaryKey> {
        self.slots
            .iter()
            .find(|(_, &slot)| self.is(slot, object))
            .map(|(key, _)| key.clone())
    }

    fn is(&self, slot: Slot, object: &Tracked<M>) -> bool {
        object.is_in(&self.blocks[slot.block as usize], slot.index)
    }

    pub(crate) fn remove(&mut self, key: &M::PrimaryKey) {
        self.slots.remove(key);
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.slots.reserve(additional);
    }

    /// Puts `object` in the map under `key`, returning the object it
    /// replaces.
    pub(crate) fn insert(&mut self, key: M::PrimaryKey, object: &Tracked<M>) -> Option<Tracked<M>> {
        let slot = self.slot_of(object);
        self.slots
            .insert(key, slot)
            .map(|previous| handle(&self.blocks, previous))
    }

    /// The slot of an object made elsewhere (by `add`, for instance). Objects
    /// of one block usually arrive one after another, so the block is kept
    /// once for all of them.
    fn slot_of(&mut self, object: &Tracked<M>) -> Slot {
        let (block, index) = object.place();
        let kept = self.blocks.last().is_some_and(|last| Arc::ptr_eq(last, block));
        if !kept {
            self.blocks.push(Arc::clone(block));
        }
        Slot {
            block: (self.blocks.len() - 1) as u32,
            index,
        }
    }

    /// The object for `key`, or the one `make` builds, kept in a block of
    /// its own.
    pub(crate) fn get_or_insert_with(
        &mut self,
        key: M::PrimaryKey,
        make: impl FnOnce() -> crate::error::Result<Block<M>>,
    ) -> crate::error::Result<(Tracked<M>, bool)> {
        match self.slots.entry(key) {
            Entry::Occupied(entry) => Ok((handle(&self.blocks, *entry.get()), false)),
            Entry::Vacant(entry) => {
                let block = make()?;
                let slot = Slot {
                    block: self.blocks.len() as u32,
                    index: 0,
                };
                let object = Tracked::in_block(&block, 0);
                self.blocks.push(block);
                entry.insert(slot);
                Ok((object, true))
            }
        }
    }

    /// Keeps a block of newly tracked objects, the i-th under `keys[i]`, and
    /// appends the objects to `out` in order. A key already in the map (a
    /// row repeated within the block) gives the object already there.
    pub(crate) fn insert_block(
        &mut self,
        keys: impl Iterator<Item = M::PrimaryKey>,
        block: Block<M>,
        out: &mut Vec<Tracked<M>>,
    ) {
        let block_id = self.blocks.len() as u32;
        let len = block.len() as u32;
        self.blocks.push(block);
        let blocks = &self.blocks;
        for (index, key) in (0..len).zip(keys) {
            match self.slots.entry(key) {
                Entry::Vacant(entry) => {
                    let slot = *entry.insert(Slot { block: block_id, index });
                    out.push(handle(blocks, slot));
                }
                Entry::Occupied(entry) => out.push(handle(blocks, *entry.get())),
            }
        }
    }

    /// Every entry, with a handle to its object.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&M::PrimaryKey, Tracked<M>)> + '_ {
        self.slots.iter().map(|(key, &slot)| (key, handle(&self.blocks, slot)))
    }
}
