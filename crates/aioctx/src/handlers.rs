//! fd and event-notifier handlers (QEMU's `AioHandler`, `aio_set_fd_handler`,
//! `aio_set_event_notifier`, `aio_dispatch_handlers`).
//!
//! One entry per descriptor, in a slab whose key, with a generation number, is the token the back
//! end reports. Replacing or removing a handler installs new callback cells and marks the old
//! ones removed, so a dispatch already holding the old cell skips it: once `set_fd_handler`
//! returns on the loop's thread, the old callbacks are never called again.
//!
//! A read handler may come with an `io_poll` callback (QEMU's `io_poll`), which the busy-polling
//! loop calls to ask "is there work?" without a system call. It lives in the read handler's cell,
//! so it is replaced, retired and quiesced together with it, and the loop keeps a snapshot of
//! the pollable handlers ([`Handlers::pollable`]) so that spinning takes no lock per round.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use slab::Slab;

use crate::callback::{Call, CallbackCell, Handler};
use crate::polling::PollHandler;
use crate::sys::{Event, Interest, Poller, RawFd, SourceKind};

/// The token of the context's own notifier; never a slab token (their low 32 bits are a slab key).
pub(crate) const NOTIFY_TOKEN: u64 = u64::MAX;

pub(crate) struct HandlerCell {
    cb: CallbackCell,
    removed: AtomicBool,
    /// The `io_poll` callback of a read handler.
    poll: Option<PollCell>,
}

/// An `io_poll` callback, adapted to a [`CallbackCell`] (which gives it the same no-re-entry,
/// quiesce and release rules as every other callback): the cell's closure records the answer in
/// `ready`, which only the polling thread (the context lock's holder) writes and reads.
struct PollCell {
    cb: CallbackCell,
    ready: Arc<AtomicBool>,
}

impl PollCell {
    fn new(mut io_poll: PollHandler) -> PollCell {
        let ready = Arc::new(AtomicBool::new(false));
        let answer = ready.clone();
        PollCell {
            cb: CallbackCell::new(Box::new(move || answer.store(io_poll(), Ordering::Relaxed))),
            ready,
        }
    }
}

impl HandlerCell {
    fn new(cb: Option<Handler>) -> Option<Arc<HandlerCell>> {
        Self::with_poll(cb, None)
    }

    fn with_poll(cb: Option<Handler>, poll: Option<PollHandler>) -> Option<Arc<HandlerCell>> {
        cb.map(|cb| {
            Arc::new(HandlerCell {
                cb: CallbackCell::new(cb),
                removed: AtomicBool::new(false),
                poll: poll.map(PollCell::new),
            })
        })
    }

    /// Runs the `io_poll` callback: true if it reports work. False if there is none, or the
    /// handler was removed, or the callback is running further up the stack.
    pub(crate) fn poll(&self) -> bool {
        let Some(p) = &self.poll else {
            return false;
        };
        p.cb.call_unless(|| self.removed.load(Ordering::Acquire)) == Call::Ran
            && p.ready.load(Ordering::Relaxed)
    }

    fn has_poll(cell: &Option<Arc<HandlerCell>>) -> bool {
        cell.as_ref().is_some_and(|c| c.poll.is_some())
    }

    /// Runs the callback unless it was removed or is running further up the stack.
    fn dispatch(&self) -> bool {
        self.cb.call_unless(|| self.removed.load(Ordering::Acquire)) == Call::Ran
    }

    /// Waits until a call of this callback running on another thread has returned.
    pub(crate) fn quiesce(&self) {
        self.cb.quiesce();
        if let Some(p) = &self.poll {
            p.cb.quiesce();
        }
    }
}

struct Entry {
    fd: RawFd,
    generation: u32,
    read: Option<Arc<HandlerCell>>,
    write: Option<Arc<HandlerCell>>,
}

impl Entry {
    fn token(&self, key: usize) -> u64 {
        (u64::from(self.generation) << 32) | key as u64
    }
}

#[derive(Default)]
struct Table {
    entries: Slab<Entry>,
    by_fd: HashMap<RawFd, usize>,
    generation: u32,
}

/// The handlers that have an `io_poll` callback, as (token, read cell).
pub(crate) type Pollable = Arc<[(u64, Arc<HandlerCell>)]>;

/// The handlers of one context.
pub(crate) struct Handlers {
    table: Mutex<Table>,
    /// Registered descriptors; when 0 and nothing asks to block, poll skips the wait syscall.
    count: AtomicUsize,
    /// The handlers that have an `io_poll` callback: rebuilt (under the table lock) whenever
    /// one is added, replaced or removed, and read by the polling loop.
    pollable: Mutex<Pollable>,
    /// `pollable.len()`, readable without the lock.
    pollable_count: AtomicUsize,
}

/// Callbacks replaced by a registration; dropped by the caller after the table lock is released,
/// because dropping user closures may run code that registers handlers.
pub(crate) type Retired = Vec<Arc<HandlerCell>>;

impl Handlers {
    pub(crate) fn new() -> Handlers {
        Handlers {
            table: Mutex::new(Table::default()),
            count: AtomicUsize::new(0),
            pollable: Mutex::new(Arc::new([])),
            pollable_count: AtomicUsize::new(0),
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Registered descriptors without an `io_poll` callback (QEMU's `poll_disable_cnt`): while
    /// there are any, a spin must also ask the back end, and one that cannot be asked (Windows)
    /// does not spin.
    pub(crate) fn unpollable(&self) -> usize {
        // Two relaxed loads may be momentarily inconsistent; a wrong answer only starts or skips
        // one polling window, and registration notifies the loop, which ends a window.
        self.count()
            .saturating_sub(self.pollable_count.load(Ordering::Relaxed))
    }

    /// The handlers with an `io_poll` callback.
    pub(crate) fn pollable(&self) -> Pollable {
        self.pollable.lock().clone()
    }

    fn rebuild_pollable(&self, table: &Table) {
        let list: Pollable = table
            .entries
            .iter()
            .filter_map(|(key, e)| {
                let read = e.read.as_ref().filter(|c| c.poll.is_some())?;
                Some((e.token(key), read.clone()))
            })
            .collect();
        self.pollable_count.store(list.len(), Ordering::Relaxed);
        *self.pollable.lock() = list;
    }

    /// Adds, replaces or (both `None`) removes the handlers of `fd`, a `kind` (which only matters
    /// when it is first added). `poll` goes with `read`, which it requires.
    pub(crate) fn set(
        &self,
        poller: &dyn Poller,
        fd: RawFd,
        kind: SourceKind,
        read: Option<Handler>,
        write: Option<Handler>,
        poll: Option<PollHandler>,
    ) -> io::Result<Retired> {
        if poll.is_some() && read.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an io_poll callback needs an io_read callback: it runs when io_poll reports work",
            ));
        }
        let interest = Interest {
            read: read.is_some(),
            write: write.is_some(),
        };
        let mut retired = Vec::new();
        let mut table = self.table.lock();
        let existing = table.by_fd.get(&fd).copied();
        let pollable_changed = poll.is_some()
            || existing.is_some_and(|key| HandlerCell::has_poll(&table.entries[key].read));
        match existing {
            None if interest.is_empty() => {}
            None => {
                let generation = table.generation;
                table.generation = table.generation.wrapping_add(1);
                let entry = table.entries.vacant_entry();
                let key = entry.key();
                let new = Entry {
                    fd,
                    generation,
                    read: HandlerCell::with_poll(read, poll),
                    write: HandlerCell::new(write),
                };
                poller.add(fd, kind, new.token(key), interest)?;
                entry.insert(new);
                table.by_fd.insert(fd, key);
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            Some(key) if interest.is_empty() => {
                let entry = table.entries.remove(key);
                table.by_fd.remove(&fd);
                self.count.fetch_sub(1, Ordering::Relaxed);
                retired.extend(entry.read.into_iter().chain(entry.write));
                // The descriptor may already be closed, which removed it from the kernel's set.
                let _ = poller.delete(fd);
            }
            Some(key) => {
                let entry = &mut table.entries[key];
                let old_interest = Interest {
                    read: entry.read.is_some(),
                    write: entry.write.is_some(),
                };
                if old_interest != interest {
                    poller.modify(fd, entry.token(key), interest)?;
                }
                let old_read =
                    std::mem::replace(&mut entry.read, HandlerCell::with_poll(read, poll));
                let old_write = std::mem::replace(&mut entry.write, HandlerCell::new(write));
                retired.extend(old_read.into_iter().chain(old_write));
            }
        }
        if pollable_changed {
            self.rebuild_pollable(&table);
        }
        drop(table);
        for cell in &retired {
            cell.removed.store(true, Ordering::Release);
        }
        Ok(retired)
    }

    /// Runs the handlers of one ready descriptor; returns whether one ran.
    pub(crate) fn dispatch(&self, event: &Event) -> bool {
        let (read, write) = self.cells_for(event);
        let mut progress = false;
        if let Some(cell) = read {
            progress |= cell.dispatch();
        }
        if let Some(cell) = write {
            progress |= cell.dispatch();
        }
        progress
    }

    /// Whether `event` would run a handler.
    pub(crate) fn wants(&self, event: &Event) -> bool {
        let (read, write) = self.cells_for(event);
        read.is_some() || write.is_some()
    }

    /// The read and write callbacks that `event` makes due, if its token is still current.
    fn cells_for(&self, event: &Event) -> (Option<Arc<HandlerCell>>, Option<Arc<HandlerCell>>) {
        let table = self.table.lock();
        let key = (event.token & 0xffff_ffff) as usize;
        match table.entries.get(key) {
            Some(e) if e.token(key) == event.token => (
                event.readable.then(|| e.read.clone()).flatten(),
                event.writable.then(|| e.write.clone()).flatten(),
            ),
            _ => (None, None),
        }
    }

    /// Removes every handler (context teardown); returns their callbacks to be dropped.
    pub(crate) fn clear(&self, poller: &dyn Poller) -> Vec<Handler> {
        let mut table = self.table.lock();
        let entries = std::mem::take(&mut table.entries);
        table.by_fd.clear();
        self.count.store(0, Ordering::Relaxed);
        self.rebuild_pollable(&table);
        drop(table);
        let mut callbacks = Vec::new();
        for (_, entry) in entries {
            let _ = poller.delete(entry.fd);
            for cell in entry.read.into_iter().chain(entry.write) {
                cell.removed.store(true, Ordering::Release);
                callbacks.extend(cell.cb.release());
                callbacks.extend(cell.poll.as_ref().and_then(|p| p.cb.release()));
            }
        }
        callbacks
    }

    /// The descriptors with handlers, for tests and diagnostics.
    pub(crate) fn fds(&self) -> Vec<RawFd> {
        self.table
            .lock()
            .entries
            .iter()
            .map(|(_, e)| e.fd)
            .collect()
    }
}
