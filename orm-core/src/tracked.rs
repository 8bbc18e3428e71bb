//! Objects a session knows about.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use crate::error::{Error, Result};

use crate::model::Model;

/// Where an object stands with its session (SQLAlchemy's object states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectStatus {
    /// Added, not yet inserted.
    Pending,
    /// In the database and in the session's identity map.
    Persistent,
    /// Marked for deletion, or deleted by a flush (and, after the commit,
    /// for good). Rolling back the flush that deleted it detaches it.
    Deleted,
    /// No longer tracked by a session: after `rollback` or `close`, or a
    /// pending object removed with `delete` before it was inserted.
    Detached,
}

/// The object's value and its last known database state.
pub(crate) struct Data<M> {
    pub(crate) value: M,
    /// The last known database state, copied when the object is first
    /// borrowed mutably; `None` means `value` is the database state.
    pub(crate) loaded: Option<M>,
    /// The object changed while a flush's statement for it was in flight, so
    /// which of its values reached the database is unknown: the next flush
    /// sends every column again.
    pub(crate) resend_all: bool,
}

/// The session's bookkeeping, apart from the value so that the session can
/// update it while the caller holds a borrow of the value.
pub(crate) struct Meta {
    pub(crate) status: ObjectStatus,
    /// Set by `commit` with `expire_on_commit`: the next load of this row
    /// overwrites the value with fresh database state.
    pub(crate) expired: bool,
    /// The session's "some object of this model may have changed" flag,
    /// raised by `write()`, so a flush need not inspect every clean object.
    pub(crate) dirty: Option<Arc<AtomicBool>>,
}

pub(crate) struct Shared<M> {
    data: RwLock<Data<M>>,
    meta: Mutex<Meta>,
    /// Counts `write()` borrows, so a flush can tell whether the object
    /// changed between building a statement and marking the object clean.
    version: AtomicU64,
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
pub struct Tracked<M> {
    pub(crate) inner: Arc<Shared<M>>,
}

impl<M> Clone for Tracked<M> {
    fn clone(&self) -> Self {
        Tracked {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M: Model + fmt::Debug> fmt::Debug for Tracked<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Tracked");
        debug.field("status", &self.status());
        match self.inner.data.try_read() {
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

impl<M: Model> Tracked<M> {
    pub(crate) fn new(value: M, status: ObjectStatus, dirty: Option<Arc<AtomicBool>>) -> Self {
        Tracked {
            inner: Arc::new(Shared {
                data: RwLock::new(Data {
                    value,
                    loaded: None,
                    resend_all: false,
                }),
                version: AtomicU64::new(0),
                meta: Mutex::new(Meta {
                    status,
                    expired: false,
                    dirty,
                }),
            }),
        }
    }

    pub(crate) fn meta(&self) -> MutexGuard<'_, Meta> {
        self.inner.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value, for the session: fails instead of waiting on a caller's
    /// mutable borrow, which could only be released after the session's call.
    pub(crate) fn data(&self) -> Result<RwLockReadGuard<'_, Data<M>>> {
        match self.inner.data.try_read() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(borrowed::<M>()),
        }
    }

    /// The value, mutably, for the session; fails on any caller's borrow.
    pub(crate) fn data_mut(&self) -> Result<RwLockWriteGuard<'_, Data<M>>> {
        match self.inner.data.try_write() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(borrowed::<M>()),
        }
    }

    /// How many times the object was borrowed mutably.
    pub(crate) fn version(&self) -> u64 {
        self.inner.version.load(Ordering::Acquire)
    }

    /// Borrows the object's current value.
    pub fn read(&self) -> TrackedRef<'_, M> {
        TrackedRef(self.inner.data.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Borrows the object mutably. The session compares it with the last
    /// known database state at the next flush.
    pub fn write(&self) -> TrackedMut<'_, M> {
        let mut data = self.inner.data.write().unwrap_or_else(PoisonError::into_inner);
        self.inner.version.fetch_add(1, Ordering::AcqRel);
        let meta = self.meta();
        if meta.status == ObjectStatus::Persistent {
            if data.loaded.is_none() {
                data.loaded = Some(data.value.clone());
            }
            if let Some(dirty) = &meta.dirty {
                dirty.store(true, Ordering::Release);
            }
        }
        drop(meta);
        TrackedMut(data)
    }

    /// A copy of the object's current value.
    pub fn get(&self) -> M {
        self.read().clone()
    }

    /// The object's state in its session.
    pub fn status(&self) -> ObjectStatus {
        self.meta().status
    }

    /// Whether a commit expired the object: its values may be stale until
    /// the session loads its row again (`get`, a query, or `refresh`).
    pub fn is_expired(&self) -> bool {
        self.meta().expired
    }

    /// True when both handles are the same object.
    pub fn ptr_eq(&self, other: &Tracked<M>) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// A shared borrow of a tracked object; derefs to the model.
pub struct TrackedRef<'a, M>(RwLockReadGuard<'a, Data<M>>);

impl<M> Deref for TrackedRef<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.0.value
    }
}

impl<M: fmt::Debug> fmt::Debug for TrackedRef<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.value.fmt(f)
    }
}

/// A mutable borrow of a tracked object; derefs to the model.
pub struct TrackedMut<'a, M>(RwLockWriteGuard<'a, Data<M>>);

impl<M> Deref for TrackedMut<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.0.value
    }
}

impl<M> DerefMut for TrackedMut<'_, M> {
    fn deref_mut(&mut self) -> &mut M {
        &mut self.0.value
    }
}

impl<M: fmt::Debug> fmt::Debug for TrackedMut<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.value.fmt(f)
    }
}
