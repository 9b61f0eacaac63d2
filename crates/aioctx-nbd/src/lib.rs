//! `aioctx-nbd`: an NBD server whose event handling is built only on the
//! [`aioctx`] event loop (no async runtime).
//!
//! Layout:
//! - [`proto`]: the wire format, pure parse/encode functions;
//! - [`handshake`]: option negotiation as a pure state machine;
//! - [`export`]: blocking file I/O on the served image;
//! - [`conn`]: one connection's state machine on an aioctx loop;
//! - [`server`]: listener, I/O threads, shutdown;
//! - [`cli`]: the command line.

#![warn(missing_docs)]

pub mod cli;
pub mod conn;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
