//! Objects a session knows about.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use crate::counted::Counted;
use crate::error::{Error, Result};

use crate::model::Model;

/// Where an object stands with its session (SQLAlchemy's object states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectStatus {
    /// Added, not yet inserted.
    Pending = 0,
    /// In the database and in the session's identity map.
    Persistent = 1,
    /// Marked for deletion, or deleted by a flush (and, after the commit,
    /// for good). Rolling back the flush that deleted it detaches it.
    Deleted = 2,
    /// No longer tracked by a session: after `rollback` or `close`, or a
    /// pending object removed with `delete` before it was inserted.
    Detached = 3,
}

/// The object's value and its last known database state.
pub(crate) struct Data<M> {
    pub(crate) value: M,
    /// The last known database state, copied when the object is first
    /// borrowed mutably; `None` means `value` is the database state. Boxed:
    /// most objects are never changed, and stay half the size.
    pub(crate) loaded: Option<Box<M>>,
}

/// What a session's state for one model shares with every object it
/// tracks, so that changes to all of them at once (forgetting them at a
/// rollback, expiring them at a commit) cost one store, not a visit to each.
#[derive(Debug, Default)]
pub(crate) struct Owner {
    /// Raised by `write()` on a persistent object: some object of this model
    /// may have changed, so a flush need not inspect every clean object.
    pub(crate) dirty: AtomicBool,
    /// Raised when the session lets go of its objects (rollback, close, or
    /// the session dropped): every object it tracked is detached from then.
    released: AtomicBool,
    /// Moved on by a commit that expires: objects loaded before it are
    /// expired. Starts at 1, so that 0 always means expired.
    epoch: AtomicU64,
}

impl Owner {
    pub(crate) fn new() -> Arc<Owner> {
        Arc::new(Owner {
            epoch: AtomicU64::new(1),
            ..Owner::default()
        })
    }

    /// Detaches every object tracked under this owner.
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::Release);
    }

    /// Expires every object tracked under this owner.
    pub(crate) fn expire_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// The session's bookkeeping, apart from the value so that the session can
/// update it while the caller holds a borrow of the value.
///
/// Atomics rather than a lock: only the session writes them (but for
/// `version`, which `write()` moves on while it holds the value's write
/// lock, and which the session reads under that lock), and it holds the
/// session exclusively while it does, so no two writers ever race, and an
/// uncontended lock and unlock cost as much again as the store. A change
/// that `write()` must see consistently with the value (an object becoming
/// persistent) is made while the value's lock is held, which `write()`
/// takes too.
///
/// Packed into 16 bytes, beside the value: a load writes this for every
/// row, and the profile showed a load slowing with each byte an object
/// takes.
pub(crate) struct Meta {
    status: AtomicU8,
    /// The owner's epoch when the value last matched the row; behind the
    /// owner's epoch means expired (the next load of the row overwrites the
    /// value with fresh database state).
    fresh_at: AtomicU64,
    /// Set once the status no longer depends on the session (a delete that
    /// was committed, an object the session let go of on its own).
    settled: AtomicBool,
    /// The object changed while a flush's statement for it was in flight, so
    /// which of its values reached the database is unknown: the next flush
    /// sends every column again. Changed with the value's lock held.
    resend_all: AtomicBool,
    /// Counts `write()` borrows, so a flush can tell whether the object
    /// changed between building a statement and marking the object clean.
    /// Compared for equality only: wrapping around would take four billion
    /// borrows during one flush.
    version: AtomicU32,
}

impl ObjectStatus {
    fn from_u8(value: u8) -> ObjectStatus {
        match value {
            0 => ObjectStatus::Pending,
            1 => ObjectStatus::Persistent,
            2 => ObjectStatus::Deleted,
            _ => ObjectStatus::Detached,
        }
    }
}

/// An object's bookkeeping, with the session state it belongs to.
pub(crate) struct MetaRef<'a> {
    meta: &'a Meta,
    owner: &'a Owner,
}

impl MetaRef<'_> {
    fn own_status(&self) -> ObjectStatus {
        ObjectStatus::from_u8(self.meta.status.load(Ordering::Acquire))
    }

    fn settled(&self) -> bool {
        self.meta.settled.load(Ordering::Acquire)
    }

    /// The status the caller sees: an object whose session let go of its
    /// objects is detached, whatever it was before.
    pub(crate) fn status(&self) -> ObjectStatus {
        let status = self.own_status();
        if status != ObjectStatus::Detached && !self.settled() && self.owner.released.load(Ordering::Acquire) {
            ObjectStatus::Detached
        } else {
            status
        }
    }

    pub(crate) fn set_status(&mut self, status: ObjectStatus) {
        self.meta.status.store(status as u8, Ordering::Release);
    }

    /// Sets a status that stays whatever the session does next.
    pub(crate) fn set_final_status(&mut self, status: ObjectStatus) {
        self.meta.status.store(status as u8, Ordering::Release);
        self.meta.settled.store(true, Ordering::Release);
    }

    pub(crate) fn is_expired(&self) -> bool {
        !self.settled() && self.meta.fresh_at.load(Ordering::Acquire) < self.owner.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn expire(&mut self) {
        self.meta.fresh_at.store(0, Ordering::Release);
    }

    /// Whether the next flush sends every column (see `Meta::resend_all`).
    pub(crate) fn resend_all(&self) -> bool {
        self.meta.resend_all.load(Ordering::Acquire)
    }

    pub(crate) fn set_resend_all(&mut self, resend_all: bool) {
        self.meta.resend_all.store(resend_all, Ordering::Release);
    }

    /// The value matches the row again.
    pub(crate) fn refresh(&mut self) {
        self.meta
            .fresh_at
            .store(self.owner.epoch.load(Ordering::Acquire), Ordering::Release);
    }
}

pub(crate) struct Shared<M> {
    data: RwLock<Data<M>>,
    meta: Meta,
}

impl<M> Data<M> {
    /// The value as the database last had it: the snapshot if the object
    /// was changed since, else the value itself. Its key is the row's key,
    /// even if the caller has edited the key field.
    pub(crate) fn stored(&self) -> &M {
        self.loaded.as_deref().unwrap_or(&self.value)
    }
}

impl<M> Shared<M> {
    // Always inlined: moving the held-back values into a block then took
    // fewer copies through the stack, and measured a little faster.
    #[inline(always)]
    fn new(value: M, status: ObjectStatus, fresh_at: u64) -> Self {
        Shared {
            data: RwLock::new(Data { value, loaded: None }),
            meta: Meta {
                status: AtomicU8::new(status as u8),
                fresh_at: AtomicU64::new(fresh_at),
                settled: AtomicBool::new(false),
                resend_all: AtomicBool::new(false),
                version: AtomicU32::new(0),
            },
        }
    }
}

/// Objects tracked together, with the session state they belong to.
/// Objects are allocated in blocks: one allocation for many rows of a load,
/// as the values themselves are the only per-row allocations a load should
/// make.
pub(crate) struct BlockInner<M> {
    owner: Arc<Owner>,
    objects: Objects<M>,
}

enum Objects<M> {
    /// An object tracked on its own (added, or loaded by a get or a join):
    /// one allocation, with the block.
    One(Shared<M>),
    Many(Box<[Shared<M>]>),
}

impl<M> BlockInner<M> {
    pub(crate) fn len(&self) -> usize {
        match &self.objects {
            Objects::One(_) => 1,
            Objects::Many(objects) => objects.len(),
        }
    }
}

/// A block, shared by its objects' handles and the identity map.
pub(crate) type Block<M> = Counted<BlockInner<M>>;

/// The largest block: a handle keeps its whole block alive, so this bounds
/// how much memory one handle can hold on to.
pub(crate) const MAX_BLOCK: usize = 64;

/// Tracks a batch of new objects (at most [`MAX_BLOCK`]) in one block.
pub(crate) fn new_block<M>(mut values: std::vec::Drain<'_, M>, status: ObjectStatus, owner: &Arc<Owner>) -> Block<M> {
    debug_assert!(values.len() <= MAX_BLOCK);
    if values.len() == 1 {
        return block_of_one(
            values.next().unwrap_or_else(|| unreachable!("one value")),
            status,
            owner,
        );
    }
    let fresh_at = owner.epoch.load(Ordering::Acquire);
    // An exact-size source: allocated once and filled in place.
    let objects = Objects::Many(values.map(|value| Shared::new(value, status, fresh_at)).collect());
    Counted::new(BlockInner {
        owner: Arc::clone(owner),
        objects,
    })
}

/// Tracks one new object in a block of its own: one allocation, not two.
pub(crate) fn block_of_one<M>(value: M, status: ObjectStatus, owner: &Arc<Owner>) -> Block<M> {
    Counted::new(BlockInner {
        owner: Arc::clone(owner),
        objects: Objects::One(Shared::new(value, status, owner.epoch.load(Ordering::Acquire))),
    })
}

/// Tracks one new object, in a block of its own.
pub(crate) fn track_one<M>(value: M, status: ObjectStatus, owner: &Arc<Owner>) -> Tracked<M> {
    Tracked {
        block: block_of_one(value, status, owner),
        index: 0,
    }
}

/// Handles to every object of a block, in order, their references to the
/// block taken in one step.
pub(crate) fn handles<M>(block: &Block<M>) -> impl Iterator<Item = Tracked<M>> {
    (0..)
        .zip(block.clones(block.len()))
        .map(|(index, block)| Tracked::from_counted(block, index))
}

/// A handle to an object tracked by a session, shared by the session's
/// identity map and the caller. Clones are the same object: loading a row
/// twice in one session gives two handles to one state.
///
/// Read with [`read`](Tracked::read) and change with
/// [`write`](Tracked::write); the session notices changes at the next
/// flush and updates only the columns that differ. Drop the guards before
/// awaiting the session: a flush that must write generated values into an
/// object still borrowed fails with [`Error::InvalidState`] rather than wait.
///
/// The objects of one load are stored in blocks of up to 64 (one
/// allocation for many rows); a block is freed when the last handle to any
/// object in it is dropped.
pub struct Tracked<M> {
    block: Block<M>,
    /// A `usize`, not the `u32` it fits in: a handle is written and read
    /// whole, as two words, which the CPU forwards from store to load
    /// without the stall a half-written word costs.
    index: usize,
}

impl<M> Clone for Tracked<M> {
    fn clone(&self) -> Self {
        Tracked {
            block: self.block.clone(),
            index: self.index,
        }
    }
}

impl<M: Model + fmt::Debug> fmt::Debug for Tracked<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Tracked");
        debug.field("status", &self.status());
        match self.shared().data.try_read() {
            Ok(data) => debug.field("value", &data.value),
            Err(_) => debug.field("value", &"<borrowed mutably>"),
        };
        debug.finish()
    }
}

fn borrowed<M: Model>() -> Error {
    Error::InvalidState(format!(
        "a {} object is borrowed (a read() or write() guard is alive) while the session needs it; \
         drop the guard before awaiting the session",
        M::TABLE.model
    ))
}

/// An object in a block the caller holds, reached through a borrow of the
/// block instead of a handle of its own: what the session's flush inspects
/// in every object of its identity map. Taking a [`Tracked`] handle for
/// each costs an atomic increment and decrement, where most objects need
/// neither (they did not change).
pub(crate) struct Held<'a, M> {
    block: &'a Block<M>,
    index: usize,
}

impl<'a, M> Held<'a, M> {
    /// The object at `index` in `block`.
    pub(crate) fn in_block(block: &'a Block<M>, index: u32) -> Self {
        Held {
            block,
            index: index as usize,
        }
    }

    #[inline]
    fn shared(&self) -> &'a Shared<M> {
        match &self.block.objects {
            Objects::One(object) => object,
            Objects::Many(objects) => &objects[self.index],
        }
    }

    /// A handle to the object.
    pub(crate) fn to_handle(&self) -> Tracked<M> {
        Tracked::from_counted(self.block.clone(), self.index)
    }
}

impl<'a, M: Model> Held<'a, M> {
    pub(crate) fn meta(&self) -> MetaRef<'a> {
        MetaRef {
            meta: &self.shared().meta,
            owner: &self.block.owner,
        }
    }

    /// See [`Tracked::data`].
    pub(crate) fn data(&self) -> Result<RwLockReadGuard<'a, Data<M>>> {
        match self.shared().data.try_read() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(borrowed::<M>()),
        }
    }

    /// See [`Tracked::data_mut`].
    pub(crate) fn data_mut(&self) -> Result<RwLockWriteGuard<'a, Data<M>>> {
        match self.shared().data.try_write() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(borrowed::<M>()),
        }
    }

    /// See [`Tracked::version`].
    pub(crate) fn version(&self) -> u32 {
        self.shared().meta.version.load(Ordering::Acquire)
    }
}

impl<M> Tracked<M> {
    /// The object, borrowed through this handle.
    #[inline]
    fn held(&self) -> Held<'_, M> {
        Held {
            block: &self.block,
            index: self.index,
        }
    }

    #[inline]
    fn shared(&self) -> &Shared<M> {
        self.held().shared()
    }

    /// A handle to the object at `index` in `block`.
    #[inline]
    pub(crate) fn in_block(block: &Block<M>, index: u32) -> Tracked<M> {
        Tracked::from_counted(block.clone(), index as usize)
    }

    /// The handle to the object at `index` of the block that `block`, a
    /// reference this handle takes over (a clone, or one of
    /// [`Counted::clones`]), points to.
    pub(crate) fn from_counted(block: Block<M>, index: usize) -> Tracked<M> {
        debug_assert!(index == 0 || matches!(block.objects, Objects::Many(_)));
        Tracked { block, index }
    }

    /// Whether this is the object at `index` in `block`.
    pub(crate) fn is_in(&self, block: &Block<M>, index: u32) -> bool {
        Counted::ptr_eq(&self.block, block) && self.index == index as usize
    }

    /// The object's block and its place in it.
    pub(crate) fn place(&self) -> (&Block<M>, u32) {
        // Below MAX_BLOCK, made from a u32.
        (&self.block, self.index as u32)
    }
}

impl<M: Model> Tracked<M> {
    pub(crate) fn meta(&self) -> MetaRef<'_> {
        self.held().meta()
    }

    /// The value, for the session: fails instead of waiting on a caller's
    /// mutable borrow, which could only be released after the session's call.
    pub(crate) fn data(&self) -> Result<RwLockReadGuard<'_, Data<M>>> {
        self.held().data()
    }

    /// The value, mutably, for the session; fails on any caller's borrow.
    pub(crate) fn data_mut(&self) -> Result<RwLockWriteGuard<'_, Data<M>>> {
        self.held().data_mut()
    }

    /// How many times the object was borrowed mutably.
    pub(crate) fn version(&self) -> u32 {
        self.held().version()
    }

    /// Borrows the object's current value, waiting while another thread
    /// writes it (or waits to).
    ///
    /// # Panics
    ///
    /// When it would wait on a guard this thread holds, which would be
    /// forever: the object's [`write`](Tracked::write) guard, or a `read`
    /// guard while another thread waits to write (the lock lets no new
    /// reader past a waiting writer). Drop the guard first. A thread holding
    /// more than eight guards at once is not checked beyond them, and such
    /// a call waits forever as a plain lock's would.
    pub fn read(&self) -> TrackedRef<'_, M> {
        let data = &self.shared().data;
        let guard = same_thread::lock::<M, _, _>(data, "read", data.try_read(), || data.read());
        TrackedRef {
            guard,
            _record: same_thread::Record::new(data),
        }
    }

    /// Borrows the object mutably, waiting while other threads read or
    /// write it. The session compares it with the last known database state
    /// at the next flush.
    ///
    /// # Panics
    ///
    /// When this thread holds a [`read`](Tracked::read) or `write` guard of
    /// the same object, as in `t.write().name = t.read().name.clone()`
    /// (the right-hand side's guard lives to the end of the statement):
    /// waiting for it would wait forever. Copy the value into a local first.
    /// As with `read`, guards beyond eight held at once are not checked.
    pub fn write(&self) -> TrackedMut<'_, M> {
        let shared = self.shared();
        let lock = &shared.data;
        let mut data = same_thread::lock::<M, _, _>(lock, "write", lock.try_write(), || lock.write());
        shared.meta.version.fetch_add(1, Ordering::AcqRel);
        let meta = self.meta();
        match meta.status() {
            ObjectStatus::Persistent => {
                if data.loaded.is_none() {
                    data.loaded = Some(Box::new(data.value.clone()));
                }
                meta.owner.dirty.store(true, Ordering::Release);
            }
            // Its DELETE finds the row by the stored key: keep it, whatever
            // the caller changes now.
            ObjectStatus::Deleted if data.loaded.is_none() => {
                data.loaded = Some(Box::new(data.value.clone()));
            }
            _ => {}
        }
        // Recorded only now: if the model's clone above panicked, the plain
        // guard went without a record left behind.
        TrackedMut {
            guard: data,
            _record: same_thread::Record::new(lock),
        }
    }

    /// A copy of the object's current value.
    ///
    /// # Panics
    ///
    /// As [`read`](Tracked::read) does.
    pub fn get(&self) -> M {
        self.read().clone()
    }

    /// The object's state in its session.
    pub fn status(&self) -> ObjectStatus {
        self.meta().status()
    }

    /// Whether a commit expired the object: its values may be stale until
    /// the session loads its row again (`get`, a query, or `refresh`).
    pub fn is_expired(&self) -> bool {
        self.meta().is_expired()
    }

    /// True when both handles are the same object.
    pub fn ptr_eq(&self, other: &Tracked<M>) -> bool {
        Counted::ptr_eq(&self.block, &other.block) && self.index == other.index
    }
}

/// The objects whose guards (from [`Tracked::read`] and [`Tracked::write`])
/// each thread holds, so that asking for a guard that one of this thread's
/// own guards blocks panics instead of waiting forever. The guards are not
/// `Send`, so each is dropped on the thread that took it.
mod same_thread {
    use std::cell::Cell;
    use std::sync::{LockResult, PoisonError, RwLock, TryLockError, TryLockResult};

    use crate::model::Model;

    /// Guards a thread holds at once, at most, that it can tell apart;
    /// beyond them a guard goes unrecorded, and asking for a guard it
    /// blocks waits as before, never panics wrongly.
    const SLOTS: usize = 8;

    thread_local! {
        /// The address of each lock with a guard this thread holds, or 0.
        static HELD: [Cell<usize>; SLOTS] = const { [const { Cell::new(0) }; SLOTS] };
    }

    fn address<T>(lock: &RwLock<T>) -> usize {
        std::ptr::from_ref(lock) as usize
    }

    /// That this thread holds a guard of one lock, for as long as the
    /// record lives: kept beside the guard, and dropped with it.
    pub(super) struct Record(Option<usize>);

    impl Record {
        /// Records a guard of `lock` taken by this thread, if a slot is free.
        pub(super) fn new<T>(lock: &RwLock<T>) -> Record {
            let address = address(lock);
            let recorded = HELD.try_with(|held| {
                let free = held.iter().find(|slot| slot.get() == 0)?;
                free.set(address);
                Some(address)
            });
            Record(recorded.ok().flatten())
        }
    }

    impl Drop for Record {
        fn drop(&mut self) {
            if let Some(address) = self.0 {
                let _ = HELD.try_with(|held| {
                    if let Some(slot) = held.iter().find(|slot| slot.get() == address) {
                        slot.set(0);
                    }
                });
            }
        }
    }

    /// The guard `attempt` got without waiting, or else the one `wait`
    /// waits for, unless this thread holds a guard of `lock`: that wait
    /// would last forever, so it panics, naming the model and what was
    /// `asked`. A poisoned lock is taken as it is.
    pub(super) fn lock<M: Model, T, G>(
        lock: &RwLock<T>,
        asked: &str,
        attempt: TryLockResult<G>,
        wait: impl FnOnce() -> LockResult<G>,
    ) -> G {
        match attempt {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let address = address(lock);
                let own = HELD
                    .try_with(|held| held.iter().any(|slot| slot.get() == address))
                    .unwrap_or(false);
                if own {
                    panic!(
                        "{asked}() on a {} object whose guard this thread still holds would wait forever; \
                         drop the read() or write() guard first (in `t.write().x = t.read().x.clone()`, \
                         copy the value into a local before the write)",
                        M::TABLE.model
                    );
                }
                wait().unwrap_or_else(PoisonError::into_inner)
            }
        }
    }
}

/// A shared borrow of a tracked object; derefs to the model.
pub struct TrackedRef<'a, M> {
    guard: RwLockReadGuard<'a, Data<M>>,
    _record: same_thread::Record,
}

impl<M> Deref for TrackedRef<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.guard.value
    }
}

impl<M: fmt::Debug> fmt::Debug for TrackedRef<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.guard.value.fmt(f)
    }
}

/// A mutable borrow of a tracked object; derefs to the model.
pub struct TrackedMut<'a, M> {
    guard: RwLockWriteGuard<'a, Data<M>>,
    _record: same_thread::Record,
}

impl<M> Deref for TrackedMut<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.guard.value
    }
}

impl<M> DerefMut for TrackedMut<'_, M> {
    fn deref_mut(&mut self) -> &mut M {
        &mut self.guard.value
    }
}

impl<M: fmt::Debug> fmt::Debug for TrackedMut<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.guard.value.fmt(f)
    }
}
