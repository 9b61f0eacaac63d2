//! Nothing to use here: this crate only holds the loom model checks of aioctx's lock-free
//! protocols, in `tests/` (`cargo test -p aioctx-loom`). Each test compiles one of the library's
//! source files again, with `crate::sync` pointing at loom's atomics and `Arc` instead of std's.
