//! A shared pointer like `Arc`, that can take many references in one
//! atomic step.
//!
//! A load hands out one handle per object, and the objects of a load share a
//! block: with `Arc`, each handle costs an atomic increment of the block's
//! count, which the profile put at a twentieth of loading 10,000 rows.
//! [`Counted::clones`] takes all of a block's handles' references with one
//! increment instead. Everything else behaves as `Arc` does (without weak
//! references, which nothing here needs).

use std::marker::PhantomData;
use std::ops::Deref;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicUsize, Ordering};

/// Counts above this abort, as `Arc` does: only leaked references could
/// get there, and an overflow would free a value still in use.
const MAX_REFS: usize = isize::MAX as usize;

/// The most references [`Counted::clones`] takes at once: far below
/// `MAX_REFS`, so that checking for overflow cannot itself overflow.
const MAX_CLONES: usize = u32::MAX as usize;

struct Inner<T> {
    refs: AtomicUsize,
    value: T,
}

/// A counted reference to a `T` on the heap, freed with its last reference.
pub(crate) struct Counted<T> {
    inner: NonNull<Inner<T>>,
    /// Owns an `Inner<T>`, for the drop checker.
    _owns: PhantomData<Inner<T>>,
}

// SAFETY: as for `Arc`: references on several threads share `T` (so it must
// be `Sync`) and any of them may drop it (so it must be `Send`); the count
// itself is atomic.
unsafe impl<T: Send + Sync> Send for Counted<T> {}
// SAFETY: see `Send`.
unsafe impl<T: Send + Sync> Sync for Counted<T> {}

// As for `Arc`: moving the pointer never moves the value.
impl<T> Unpin for Counted<T> {}
impl<T: RefUnwindSafe> UnwindSafe for Counted<T> {}

impl<T> Counted<T> {
    pub(crate) fn new(value: T) -> Self {
        let inner = Box::new(Inner {
            refs: AtomicUsize::new(1),
            value,
        });
        Counted {
            inner: NonNull::from(Box::leak(inner)),
            _owns: PhantomData,
        }
    }

    fn inner(&self) -> &Inner<T> {
        // SAFETY: `inner` came from `Box::leak` and is freed only when the
        // last reference goes, and `self` is one.
        unsafe { self.inner.as_ref() }
    }

    /// Adds `count` references (at most `MAX_CLONES`); the caller makes
    /// that many values that each own one.
    fn add_refs(&self, count: usize) {
        let before = self.inner().refs.fetch_add(count, Ordering::Relaxed);
        if before > MAX_REFS - count {
            std::process::abort();
        }
    }

    /// Whether both are references to the same value.
    pub(crate) fn ptr_eq(this: &Self, other: &Self) -> bool {
        this.inner == other.inner
    }

    /// `count` new references, taken with one atomic increment. The
    /// iterator owns them: it may outlive `self`.
    ///
    /// # Panics
    ///
    /// If `count` is above `u32::MAX`, before taking any.
    pub(crate) fn clones(&self, count: usize) -> Clones<T> {
        assert!(
            count <= MAX_CLONES,
            "Counted::clones takes at most u32::MAX references at once"
        );
        if count == 0 {
            return Clones { last: None, before: 0 };
        }
        self.add_refs(count);
        Clones {
            last: Some(Counted {
                inner: self.inner,
                _owns: PhantomData,
            }),
            before: count - 1,
        }
    }
}

impl<T> Clone for Counted<T> {
    fn clone(&self) -> Self {
        self.add_refs(1);
        Counted {
            inner: self.inner,
            _owns: PhantomData,
        }
    }
}

impl<T> Deref for Counted<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.inner().value
    }
}

impl<T> Counted<T> {
    /// Frees the value, once its last reference is gone.
    #[cold]
    #[inline(never)]
    fn free(&mut self) {
        fence(Ordering::Acquire);
        // SAFETY: the caller let go of the last reference, so nothing else
        // can reach `inner`, which `Box::leak` made.
        drop(unsafe { Box::from_raw(self.inner.as_ptr()) });
    }
}

impl<T> Drop for Counted<T> {
    #[inline]
    fn drop(&mut self) {
        // Release, so that this thread's uses of the value happen before
        // whichever thread frees it; that thread acquires them in `free`.
        if self.inner().refs.fetch_sub(1, Ordering::Release) == 1 {
            self.free();
        }
    }
}

/// References taken ahead by [`Counted::clones`], handed out one by one;
/// those not handed out are given back when this is dropped.
pub(crate) struct Clones<T> {
    /// The reference handed out last. Holding it as a `Counted` keeps the
    /// value alive for the others, which the iterator counts in `before`.
    last: Option<Counted<T>>,
    before: usize,
}

impl<T> Iterator for Clones<T> {
    type Item = Counted<T>;

    #[inline]
    fn next(&mut self) -> Option<Counted<T>> {
        if self.before == 0 {
            return self.last.take();
        }
        self.before -= 1;
        let last = self.last.as_ref()?;
        // The reference was counted when this was made.
        Some(Counted {
            inner: last.inner,
            _owns: PhantomData,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let len = self.before + usize::from(self.last.is_some());
        (len, Some(len))
    }
}

impl<T> ExactSizeIterator for Clones<T> {}

impl<T> Drop for Clones<T> {
    fn drop(&mut self) {
        if let Some(last) = &self.last {
            if self.before > 0 {
                // `last` still holds a reference, so this never reaches zero.
                last.inner().refs.fetch_sub(self.before, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Counts its drops.
    struct Probe(Arc<AtomicUsize>);

    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn probe() -> (Counted<Probe>, Arc<AtomicUsize>) {
        let drops = Arc::new(AtomicUsize::new(0));
        (Counted::new(Probe(Arc::clone(&drops))), drops)
    }

    fn refs<T>(counted: &Counted<T>) -> usize {
        counted.inner().refs.load(Ordering::SeqCst)
    }

    #[test]
    fn the_value_is_freed_with_its_last_reference() {
        let (first, drops) = probe();
        let second = first.clone();
        assert!(Counted::ptr_eq(&first, &second));
        drop(first);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(second);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn clones_taken_at_once_each_own_a_reference() {
        let (source, drops) = probe();
        let clones: Vec<_> = source.clones(64).collect();
        assert_eq!(refs(&source), 65);
        drop(source);
        for (left, clone) in (0..64).rev().zip(clones) {
            assert_eq!(drops.load(Ordering::SeqCst), 0);
            assert_eq!(refs(&clone), left + 1);
        }
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn clones_not_taken_are_given_back() {
        let (source, drops) = probe();
        let mut clones = source.clones(10);
        let taken: Vec<_> = clones.by_ref().take(3).collect();
        assert_eq!(clones.len(), 7);
        drop(clones);
        assert_eq!(refs(&source), 4);
        drop(taken);
        assert_eq!(refs(&source), 1);
        drop(source);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn clones_outlive_their_source() {
        let (source, drops) = probe();
        let mut clones = source.clones(3);
        drop(source);
        let first = clones.next().expect("three were taken");
        assert_eq!(refs(&first), 3);
        // The two not handed out keep the value alive until given back.
        drop(first);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(clones);
        assert_eq!(drops.load(Ordering::SeqCst), 1);

        let (source, drops) = probe();
        assert_eq!(source.clones(0).len(), 0);
        assert_eq!(refs(&source), 1);
        drop(source);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_pointer_moves_freely_whatever_it_points_to() {
        fn assert_unpin<T: Unpin>() {}
        fn assert_unwind_safe<T: UnwindSafe>() {}
        assert_unpin::<Counted<std::marker::PhantomPinned>>();
        // Shared but never handed out mutably, as `Arc` has it.
        assert_unwind_safe::<Counted<&'static mut u8>>();
    }

    #[test]
    #[should_panic(expected = "at most u32::MAX")]
    fn too_many_clones_at_once_are_refused_before_counting() {
        let (source, _drops) = probe();
        let _ = source.clones(usize::MAX);
    }

    #[test]
    fn references_dropped_on_other_threads_free_the_value_once() {
        let (source, drops) = probe();
        let threads: Vec<_> = source
            .clones(8)
            .map(|reference| {
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        drop(reference.clone());
                    }
                })
            })
            .collect();
        drop(source);
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
