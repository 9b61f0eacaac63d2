//! The Windows event notifier: a manual-reset event object (QEMU's
//! `util/event_notifier-win32.c`).

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};

use windows_sys::Win32::Foundation::{HANDLE, WAIT_OBJECT_0};
use windows_sys::Win32::System::Threading::{
    CreateEventW, ResetEvent, SetEvent, WaitForSingleObject,
};

use super::windows::os_error;
use super::RawFd;

/// An unnamed, manual-reset, initially clear event object.
///
/// Manual reset is what makes it level-triggered: a wait does not consume the signal, so it stays
/// set (and every wait reports it) until [`test_and_clear`](Self::test_and_clear).
#[derive(Debug)]
pub(crate) struct WinEvent {
    handle: OwnedHandle,
}

impl WinEvent {
    pub(crate) fn new() -> io::Result<WinEvent> {
        // SAFETY: null security attributes and name are allowed; the flags are plain BOOLs.
        let h = unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) };
        if h.is_null() {
            return Err(os_error("CreateEventW"));
        }
        // SAFETY: `h` was just returned by CreateEventW and is owned by nobody else.
        Ok(WinEvent {
            handle: unsafe { OwnedHandle::from_raw_handle(h) },
        })
    }

    /// Signals the event.
    pub(crate) fn set(&self) -> io::Result<()> {
        // SAFETY: the handle is a live event object we own.
        if unsafe { SetEvent(self.handle()) } == 0 {
            return Err(os_error("SetEvent"));
        }
        Ok(())
    }

    /// Clears the event without looking at it.
    pub(crate) fn reset(&self) {
        // SAFETY: the handle is a live event object we own. ResetEvent cannot fail on it.
        unsafe { ResetEvent(self.handle()) };
    }

    /// Clears the event; returns whether it was set.
    ///
    /// A `set` that lands between the look and the reset is merged into this `true`: its caller
    /// published its work before signalling, and the kernel orders both calls on the object, so
    /// the consumer, which acts after this returns, sees that work too.
    pub(crate) fn test_and_clear(&self) -> bool {
        // SAFETY: the handle is a live event object we own; a zero timeout never blocks.
        let signalled = unsafe { WaitForSingleObject(self.handle(), 0) } == WAIT_OBJECT_0;
        if signalled {
            self.reset();
        }
        signalled
    }

    pub(crate) fn handle(&self) -> HANDLE {
        self.handle.as_raw_handle()
    }

    /// The handle's value, the key this notifier is registered under (see `SourceKind`).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.handle() as usize as RawFd
    }
}
