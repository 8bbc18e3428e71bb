//! The identity map: one object per primary key.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use crate::counted::Counted;
use crate::error::Result;
use crate::model::Model;
use crate::query::Pending;
use crate::sql::LoadSizes;
use crate::tracked::{Block, Held, Tracked, MAX_BLOCK};

/// The most keys a load makes room for ahead, on a hint: a statement
/// whose last load was huge must not make the next one allocate for all
/// of it at once.
const MAX_EXPECTED: usize = 65_536;

/// Where an object lives: its block among those the map keeps, and its
/// place in the block.
#[derive(Clone, Copy, Debug)]
struct Slot {
    block: u32,
    index: u32,
}

/// A block the map keeps, with how many of its objects the map holds.
struct Kept<M> {
    block: Block<M>,
    live: u32,
}

/// The blocks an identity map keeps alive, each at a place that slots name.
struct KeptBlocks<M> {
    blocks: Vec<Option<Kept<M>>>,
    /// Places in `blocks` free for the next block.
    free: Vec<u32>,
    /// The block kept last, which objects inserted one by one (after a
    /// flush) most often share.
    last: Option<u32>,
}

impl<M> KeptBlocks<M> {
    /// The block at `id`; a slot only ever names a kept block.
    fn block_at(&self, id: u32) -> &Block<M> {
        match &self.blocks[id as usize] {
            Some(kept) => &kept.block,
            None => unreachable!("a slot names a block the map keeps"),
        }
    }

    /// A handle to the object in `slot`.
    fn handle(&self, slot: Slot) -> Tracked<M> {
        Tracked::in_block(self.block_at(slot.block), slot.index)
    }

    /// The object in `slot`, borrowed.
    fn held(&self, slot: Slot) -> Held<'_, M> {
        Held::in_block(self.block_at(slot.block), slot.index)
    }

    fn is(&self, slot: Slot, object: &Tracked<M>) -> bool {
        object.is_in(self.block_at(slot.block), slot.index)
    }

    /// Keeps `block`, holding `live` of its objects, and returns its place.
    fn keep(&mut self, block: Block<M>, live: u32) -> u32 {
        let id = self.reserve();
        self.fill(id, block, live);
        id
    }

    /// A place for a block not made yet; slots may name it before
    /// [`fill`](Self::fill) puts the block there, but no handle may be
    /// taken from it until then.
    fn reserve(&mut self) -> u32 {
        match self.free.pop() {
            Some(id) => id,
            None => {
                self.blocks.push(None);
                u32::try_from(self.blocks.len() - 1).unwrap_or_else(|_| unreachable!("2^32 blocks"))
            }
        }
    }

    /// Puts `block`, holding `live` of its objects, at the place
    /// [`reserve`](Self::reserve) gave.
    fn fill(&mut self, id: u32, block: Block<M>, live: u32) {
        debug_assert!(self.blocks[id as usize].is_none());
        self.blocks[id as usize] = Some(Kept { block, live });
        self.last = Some(id);
    }

    /// Sets how many objects of the block at `id` the map holds.
    fn set_live(&mut self, id: u32, live: u32) {
        debug_assert!(self.blocks[id as usize].is_some(), "a kept block");
        if let Some(kept) = &mut self.blocks[id as usize] {
            kept.live = live;
        }
    }

    /// One object of the block at `id` left the map; the block goes with
    /// its last one.
    fn release(&mut self, id: u32) {
        debug_assert!(self.blocks[id as usize].is_some(), "a kept block");
        if let Some(kept) = &mut self.blocks[id as usize] {
            kept.live -= 1;
            if kept.live == 0 {
                self.blocks[id as usize] = None;
                self.free.push(id);
                if self.last == Some(id) {
                    self.last = None;
                }
            }
        }
    }

    /// The slot of an object made elsewhere (by `add`, or a join's row),
    /// counted as held. Objects of one block usually arrive one after
    /// another, so the block is kept once for all of them.
    fn slot_of(&mut self, object: &Tracked<M>) -> Slot {
        let (block, index) = object.place();
        let last = self.last.and_then(|id| match &mut self.blocks[id as usize] {
            Some(kept) if Counted::ptr_eq(&kept.block, block) => {
                kept.live += 1;
                Some(id)
            }
            _ => None,
        });
        let id = match last {
            Some(id) => id,
            None => self.keep(block.clone(), 1),
        };
        Slot { block: id, index }
    }
}

/// The identity map of one model. An entry is a slot in one of the blocks
/// the map keeps alive, rather than a handle: loading a block of 64 rows
/// takes one reference to the block instead of one per object, entries are
/// half the size, and forgetting them all frees each block once.
///
/// The map lets go of a block once it holds none of its objects (all
/// deleted, say), so a long-lived session does not accumulate them.
///
/// A load whose keys arrive in strictly ascending order (a query ordered by
/// the key, or a table read in the order it was filled) can repeat no key,
/// so if the map was empty when it began, its blocks need no hashing while
/// rows stream in: they are kept *unindexed*, with their keys, in
/// ascending order. Lookups by key (`get`, a join's rows) search those keys
/// by bisection; anything that changes or scans the map hashes them first.
/// A read-only session never pays for hashing, and a join row whose key is
/// out of order (the last row bringing the first author) hashes only the
/// keys of the block being gathered, not those of the blocks before.
pub(crate) struct Identities<M: Model> {
    slots: HashMap<M::PrimaryKey, Slot, foldhash::fast::RandomState>,
    /// Blocks kept but not in `slots` yet, in load order.
    unindexed: Vec<UnindexedBlock>,
    /// The keys of the unindexed blocks' objects, block after block: one
    /// list rather than one per block, which cost an allocation each. No
    /// key among them repeats, nor is any in `slots`.
    unindexed_keys: Vec<M::PrimaryKey>,
    kept: KeptBlocks<M>,
    /// The block a join is gathering its new objects into.
    gathering: Option<Gathering<M>>,
    /// The emptied key list of the block gathered last, for the next one:
    /// a join gathers a block every 64 rows, and growing a new list for
    /// each cost more than hashing the keys would.
    spare_keys: Vec<M::PrimaryKey>,
    /// How many keys the load under way is expected to hash in, from the
    /// statement's last load (see [`Identities::make_room`]), and how many
    /// it has hashed so far.
    expected: usize,
    hashed: usize,
}

/// An unindexed block: its place in `kept`, and where its keys end in
/// `unindexed_keys` (they start where the previous block's end).
#[derive(Clone, Copy)]
struct UnindexedBlock {
    id: u32,
    end: usize,
}

/// The slot of `key` among the unindexed blocks, by bisection: their keys
/// ascend.
fn find_unindexed<K: Ord>(blocks: &[UnindexedBlock], keys: &[K], key: &K) -> Option<Slot> {
    let position = keys.binary_search(key).ok()?;
    let block = blocks.partition_point(|block| block.end <= position);
    let start = block.checked_sub(1).map_or(0, |before| blocks[before].end);
    Some(Slot {
        block: blocks[block].id,
        index: (position - start) as u32,
    })
}

/// A block a join gathers: how many objects it will hold, and either their
/// keys, not hashed yet, or the place reserved for it in `kept`, which the
/// slots of its objects name before the block exists.
struct Gathering<M: Model> {
    len: u32,
    keys: Vec<M::PrimaryKey>,
    place: Option<u32>,
}

impl<M: Model> Gathering<M> {
    /// The block being gathered, started if there is none, its key list
    /// taken from `spare_keys`.
    fn current<'g>(gathering: &'g mut Option<Self>, spare_keys: &mut Vec<M::PrimaryKey>) -> &'g mut Self {
        gathering.get_or_insert_with(|| {
            debug_assert!(spare_keys.is_empty());
            Gathering {
                len: 0,
                keys: std::mem::take(spare_keys),
                place: None,
            }
        })
    }

    /// Counts one more object in the block and returns its place there.
    fn next_index(&mut self) -> u32 {
        self.len += 1;
        self.len - 1
    }
}

impl<M: Model> Default for Identities<M> {
    fn default() -> Self {
        Identities {
            slots: HashMap::default(),
            unindexed: Vec::new(),
            unindexed_keys: Vec::new(),
            kept: KeptBlocks {
                blocks: Vec::new(),
                free: Vec::new(),
                last: None,
            },
            gathering: None,
            spare_keys: Vec::new(),
            expected: 0,
            hashed: 0,
        }
    }
}

impl<M: Model> Identities<M> {
    pub(crate) fn len(&self) -> usize {
        self.slots.len() + self.unindexed_keys.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hashes the unindexed blocks' keys, before anything changes or scans
    /// the map.
    #[inline]
    fn index(&mut self) {
        self.debug_assert_not_gathering();
        if !self.unindexed.is_empty() {
            self.index_unindexed();
        }
    }

    /// Slots name a place without a block only while a join gathers one,
    /// and nothing but the join may use the map meanwhile.
    #[inline]
    fn debug_assert_not_gathering(&self) {
        debug_assert!(
            self.gathering.is_none(),
            "the identity map is used while a join gathers a block"
        );
    }

    #[cold]
    fn index_unindexed(&mut self) {
        self.slots.reserve(self.unindexed_keys.len());
        let mut keys = std::mem::take(&mut self.unindexed_keys).into_iter();
        for UnindexedBlock { id: block, .. } in std::mem::take(&mut self.unindexed) {
            let len = self.kept.block_at(block).len() as u32;
            for (index, key) in (0..len).zip(keys.by_ref()) {
                let previous = self.slots.insert(key, Slot { block, index });
                debug_assert!(previous.is_none(), "unindexed keys never repeat");
            }
        }
    }

    /// The object for `key`.
    pub(crate) fn get(&mut self, key: &M::PrimaryKey) -> Option<Tracked<M>> {
        self.debug_assert_not_gathering();
        let slot = match self.slots.get(key) {
            Some(&slot) => slot,
            None => find_unindexed(&self.unindexed, &self.unindexed_keys, key)?,
        };
        Some(self.kept.handle(slot))
    }

    /// The object for `key`, or else the one `track` (given the key) makes,
    /// put in the map under `key`: one probe either way. The flag tells
    /// whether the object was there already.
    pub(crate) fn get_or_insert_with(
        &mut self,
        key: M::PrimaryKey,
        track: impl FnOnce(&M::PrimaryKey) -> Result<Tracked<M>>,
    ) -> Result<(Tracked<M>, bool)> {
        self.index();
        match self.slots.entry(key) {
            Entry::Occupied(entry) => Ok((self.kept.handle(*entry.get()), true)),
            Entry::Vacant(entry) => {
                let object = track(entry.key())?;
                entry.insert(self.kept.slot_of(&object));
                Ok((object, false))
            }
        }
    }

    /// The map's object for `key`, or its place in the block being
    /// gathered; for a key new to the map, `gather` (given the key) holds
    /// the object's value back (to be tracked at that place) and the key
    /// goes in the map, named for that place (or waits beside the block,
    /// unhashed: see below), unless `gather` fails.
    ///
    /// While nothing is hashed, a key above every key held is new without
    /// a probe: a join whose rows bring a model in key order (its left side,
    /// ordered by the key) gathers it unindexed, as a load in key order
    /// does. Any other key is looked up: among the hashed keys (with the
    /// block being gathered, hashed first) and, by bisection, among the
    /// unindexed blocks' keys, which stay unhashed.
    #[inline(always)]
    pub(crate) fn get_or_gather(
        &mut self,
        key: M::PrimaryKey,
        gather: impl FnOnce(&M::PrimaryKey) -> Result<()>,
    ) -> Result<Pending<Tracked<M>>> {
        let gathering_keys = self.gathering.as_ref().map(|gathering| &gathering.keys);
        let last = gathering_keys
            .and_then(|keys| keys.last())
            .or_else(|| self.unindexed_keys.last());
        if self.slots.is_empty() && last.is_none_or(|last| key > *last) {
            gather(&key)?;
            let gathering = Gathering::current(&mut self.gathering, &mut self.spare_keys);
            let index = gathering.next_index();
            gathering.keys.push(key);
            return Ok(Pending::Gathering(index as usize));
        }
        self.get_or_gather_hashed(key, gather)
    }

    /// [`get_or_gather`](Self::get_or_gather) for a key that needs a probe.
    #[inline(never)]
    fn get_or_gather_hashed(
        &mut self,
        key: M::PrimaryKey,
        gather: impl FnOnce(&M::PrimaryKey) -> Result<()>,
    ) -> Result<Pending<Tracked<M>>> {
        self.hash_gathering();
        // Counted even with no hint waiting: only a load that hashed many
        // keys leaves one for the next.
        self.make_room(1);
        let Identities {
            slots,
            kept,
            gathering,
            spare_keys,
            unindexed,
            unindexed_keys,
            ..
        } = self;
        match slots.entry(key) {
            Entry::Occupied(entry) => {
                let slot = *entry.get();
                Ok(match gathering.as_ref().and_then(|gathering| gathering.place) {
                    Some(place) if place == slot.block => Pending::Gathering(slot.index as usize),
                    _ => Pending::Ready(kept.handle(slot)),
                })
            }
            Entry::Vacant(entry) => {
                // Kept unindexed by an earlier block: found without hashing
                // that block's keys.
                if let Some(slot) = find_unindexed(unindexed, unindexed_keys, entry.key()) {
                    return Ok(Pending::Ready(kept.handle(slot)));
                }
                gather(entry.key())?;
                let gathering = Gathering::current(gathering, spare_keys);
                let place = *gathering.place.get_or_insert_with(|| kept.reserve());
                let index = gathering.next_index();
                entry.insert(Slot { block: place, index });
                Ok(Pending::Gathering(index as usize))
            }
        }
    }

    /// Hashes the keys of the block being gathered, naming for each the
    /// place reserved for the block.
    fn hash_gathering(&mut self) {
        let additional = self.gathering.as_ref().map_or(0, |gathering| gathering.keys.len());
        if additional == 0 {
            return;
        }
        self.make_room(additional);
        let Some(gathering) = &mut self.gathering else { return };
        let place = *gathering.place.get_or_insert_with(|| self.kept.reserve());
        for (index, key) in (0..).zip(gathering.keys.drain(..)) {
            self.slots.insert(key, Slot { block: place, index });
        }
    }

    /// Keeps the gathered block, made from the values `get_or_gather` held
    /// back, in order: unindexed if its keys were never hashed, else at the
    /// place its objects' slots name.
    pub(crate) fn finish_gathering(&mut self, block: Block<M>) {
        let Some(mut gathering) = self.gathering.take() else {
            unreachable!("a block is being gathered")
        };
        debug_assert_eq!(block.len(), gathering.len as usize);
        match gathering.place {
            Some(place) => self.kept.fill(place, block, gathering.len),
            None => self.insert_unindexed(gathering.keys.drain(..), block),
        }
        // Hashing the block's keys (a place) drained them already.
        debug_assert!(gathering.keys.is_empty());
        gathering.keys.clear();
        self.spare_keys = gathering.keys;
    }

    /// Whether `object` is the map's object for `key`.
    pub(crate) fn holds(&mut self, key: &M::PrimaryKey, object: &Tracked<M>) -> bool {
        self.index();
        self.slots.get(key).is_some_and(|&slot| self.kept.is(slot, object))
    }

    /// The key under which the map holds `object`, found by visiting every
    /// entry.
    pub(crate) fn key_of(&mut self, object: &Tracked<M>) -> Option<M::PrimaryKey> {
        self.index();
        self.slots
            .iter()
            .find(|(_, &slot)| self.kept.is(slot, object))
            .map(|(key, _)| key.clone())
    }

    pub(crate) fn remove(&mut self, key: &M::PrimaryKey) {
        self.index();
        if let Some(slot) = self.slots.remove(key) {
            self.kept.release(slot.block);
        }
    }

    /// Starts a load by the statement whose last load is `sizes`, as its
    /// `side`: the map makes room ahead as that load needed, once this one
    /// hashes enough keys (see [`make_room`](Self::make_room)). Returns the
    /// map's size now, for [`end_load`](Self::end_load).
    pub(crate) fn start_load(&mut self, sizes: LoadSizes<'_>, side: usize) -> usize {
        self.expected = sizes.get(side).min(MAX_EXPECTED);
        self.hashed = 0;
        self.len()
    }

    /// Ends the load that [`start_load`](Self::start_load) began when the
    /// map held `before` objects. Only a load that hashed more than a
    /// block's worth of keys, large enough to take a hint, records how many
    /// objects it added: a statement keeps its large loads' size.
    pub(crate) fn end_load(&mut self, sizes: LoadSizes<'_>, side: usize, before: usize) {
        if self.hashed > MAX_BLOCK {
            sizes.set(side, self.len().saturating_sub(before));
        }
        self.expected = 0;
        self.hashed = 0;
    }

    /// Room for `additional` more keys, and once this load has hashed more
    /// than a block's worth, for as many as it is expected to hash in all:
    /// growing the map by doubling rehashes everything it holds each time.
    /// A load that stays small (a get, a short page) never takes the hint,
    /// so a statement whose last load was large costs it nothing.
    pub(crate) fn make_room(&mut self, additional: usize) {
        let before = self.hashed;
        self.hashed += additional;
        let ahead = if self.hashed > MAX_BLOCK {
            std::mem::take(&mut self.expected).saturating_sub(before)
        } else {
            0
        };
        self.slots.reserve(additional.max(ahead));
    }

    /// Puts `object` in the map under `key`, returning the object it
    /// replaces.
    pub(crate) fn insert(&mut self, key: M::PrimaryKey, object: &Tracked<M>) -> Option<Tracked<M>> {
        self.index();
        let slot = self.kept.slot_of(object);
        let previous = self.slots.insert(key, slot)?;
        let replaced = self.kept.handle(previous);
        self.kept.release(previous.block);
        Some(replaced)
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
        self.index();
        let len = block.len() as u32;
        let id = self.kept.keep(block, 0);
        let block = self.kept.block_at(id);
        let mut live = 0;
        for (index, key) in (0..len).zip(keys) {
            match self.slots.entry(key) {
                Entry::Vacant(entry) => {
                    entry.insert(Slot { block: id, index });
                    live += 1;
                    out.push(Tracked::in_block(block, index));
                }
                Entry::Occupied(entry) => out.push(self.kept.handle(*entry.get())),
            }
        }
        // The count starts at one more than the objects held: letting go of
        // it frees a block whose every row repeated a key already held.
        self.kept.set_live(id, live + 1);
        self.kept.release(id);
    }

    /// Keeps a block of tracked objects without hashing their keys (see the
    /// type's description), the i-th object under the i-th of `keys`. The
    /// caller guarantees that no key repeats within the block or is in the
    /// map already.
    pub(crate) fn insert_unindexed(&mut self, keys: impl Iterator<Item = M::PrimaryKey>, block: Block<M>) {
        self.debug_assert_not_gathering();
        let len = block.len();
        let before = self.unindexed_keys.len();
        self.unindexed_keys.extend(keys);
        debug_assert_eq!(self.unindexed_keys.len() - before, len);
        let id = self.kept.keep(block, len as u32);
        self.unindexed.push(UnindexedBlock {
            id,
            end: self.unindexed_keys.len(),
        });
    }

    /// The last key of the unindexed blocks: a load that goes on with a
    /// greater key may stay unindexed.
    pub(crate) fn last_unindexed_key(&self) -> Option<&M::PrimaryKey> {
        self.unindexed_keys.last()
    }

    /// Every entry, with its object borrowed from its block.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&M::PrimaryKey, Held<'_, M>)> + '_ {
        self.debug_assert_not_gathering();
        let slots = self
            .unindexed
            .iter()
            .flat_map(move |&UnindexedBlock { id: block, .. }| {
                let len = self.kept.block_at(block).len() as u32;
                (0..len).map(move |index| Slot { block, index })
            });
        let unindexed = self
            .unindexed_keys
            .iter()
            .zip(slots)
            .map(|(key, slot)| (key, self.kept.held(slot)));
        self.slots
            .iter()
            .map(|(key, &slot)| (key, self.kept.held(slot)))
            .chain(unindexed)
    }
}
