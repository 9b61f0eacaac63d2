//! An aioctx context driven by a GLib main loop (QEMU's main loop, in miniature): the context is
//! attached to GLib's default main context as a source (`AioContext::g_source`), and
//! `glib::MainLoop::run` does the waiting. On it run:
//!
//! * an aioctx timer that ticks three times, 100 ms apart;
//! * a BH scheduled from another thread, which wakes GLib's poll;
//! * socket handlers: a listener accepts a loopback connection, and the connection's read
//!   handler prints what a client thread sends until it hangs up;
//! * next to them, a plain GLib timeout on the same main context.
//!
//! When all three aioctx jobs are done, the last one quits the main loop; everything is then
//! unregistered and the threads joined. Run it with
//! `cargo run -p aioctx --features glib --example glib_loop`.

#[cfg(unix)]
fn main() -> std::io::Result<()> {
    demo::run()
}

#[cfg(not(unix))]
fn main() {
    eprintln!("AioContext::g_source is Unix-only");
}

#[cfg(unix)]
mod demo {
    use std::io::{self, Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    use aioctx::glib::{self, ControlFlow, MainLoop};
    use aioctx::{clock_get_ns, AioContext, ClockType, Timer, SCALE_MS};

    /// Jobs still running; the one that finishes last quits the main loop.
    struct Jobs {
        left: AtomicUsize,
        main_loop: MainLoop,
        start: Instant,
    }

    impl Jobs {
        fn say(&self, what: &str) {
            println!(
                "[{:>4} ms] {:<10} {what}",
                self.start.elapsed().as_millis(),
                thread::current().name().unwrap_or("?"),
            );
        }

        fn done(&self, what: &str) {
            let left = self.left.fetch_sub(1, Ordering::SeqCst) - 1;
            self.say(&format!("{what} [jobs left: {left}]"));
            if left == 0 {
                self.say("all jobs done: quitting the GLib main loop");
                self.main_loop.quit();
            }
        }
    }

    pub fn run() -> io::Result<()> {
        let ctx = AioContext::new()?;
        let main_loop = MainLoop::new(None, false);
        let jobs = Arc::new(Jobs {
            left: AtomicUsize::new(3),
            main_loop: main_loop.clone(),
            start: Instant::now(),
        });

        // The context as a GLib source on the default main context (QEMU's main-loop.c does the
        // same with qemu_aio_context).
        let source = ctx.g_source();
        source.attach(None);
        jobs.say(&format!(
            "attached an AioContext ({:?} back end) to GLib's default main context",
            ctx.backend()
        ));

        // 1. An aioctx timer, rearmed from its own callback.
        let ticks = Arc::new(AtomicUsize::new(0));
        let timer_slot: Arc<Mutex<Option<Timer>>> = Arc::new(Mutex::new(None));
        let (j, slot) = (jobs.clone(), Arc::downgrade(&timer_slot));
        let timer = ctx.timer_new(ClockType::Realtime, SCALE_MS, move || {
            let n = ticks.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 3 {
                j.say(&format!("aioctx timer: tick {n}"));
                if let Some(slot) = slot.upgrade() {
                    let now_ms = clock_get_ns(ClockType::Realtime) / SCALE_MS;
                    slot.lock().unwrap().as_ref().unwrap().modify(now_ms + 100);
                }
            } else {
                j.done("aioctx timer: tick 3, stopping");
            }
        });
        timer.modify(clock_get_ns(ClockType::Realtime) / SCALE_MS + 100);
        *timer_slot.lock().unwrap() = Some(timer);

        // 2. A BH scheduled from another thread once it has its result.
        let worker = {
            let (ctx, j) = (ctx.clone(), jobs.clone());
            thread::Builder::new()
                .name("worker".into())
                .spawn(move || {
                    let sum: u64 = (1..=1_000_000u64).sum();
                    j.say(&format!("computed {sum}, scheduling a BH"));
                    ctx.bh_schedule_oneshot(move || {
                        j.done(&format!("BH from the worker thread: the sum is {sum}"));
                    });
                })?
        };

        // 3. A listener whose read handler accepts one connection, then a read handler on the
        // connection that prints what arrives and unregisters itself at end-of-file.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let listener_fd = listener.as_raw_fd();
        let (weak_ctx, j, l) = (ctx.downgrade(), jobs.clone(), listener.clone());
        ctx.set_fd_handler(
            listener_fd,
            Some(Box::new(move || {
                let Ok((conn, peer)) = l.accept() else {
                    return; // spurious readiness: nothing to accept yet
                };
                let Some(ctx) = weak_ctx.upgrade() else {
                    return;
                };
                conn.set_nonblocking(true).expect("non-blocking connection");
                j.say(&format!("listener: accepted {peer}"));
                // One connection is all we want: stop listening.
                ctx.set_fd_handler(listener_fd, None, None)
                    .expect("remove the listener's handler");

                let conn_fd = conn.as_raw_fd();
                let (weak_ctx, j) = (ctx.downgrade(), j.clone());
                let mut conn = Some(conn);
                let on_readable = move || {
                    let Some(stream) = conn.as_mut() else { return };
                    let mut buf = [0u8; 256];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) => {
                                // Unregister before the descriptor closes (when `conn` drops).
                                if let Some(ctx) = weak_ctx.upgrade() {
                                    ctx.set_fd_handler(conn_fd, None, None)
                                        .expect("remove the connection's handler");
                                }
                                conn = None;
                                j.done("socket: the client hung up");
                                return;
                            }
                            Ok(n) => j.say(&format!(
                                "socket: read {:?}",
                                String::from_utf8_lossy(&buf[..n])
                            )),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => panic!("read: {e}"),
                        }
                    }
                };
                ctx.set_fd_handler(conn_fd, Some(Box::new(on_readable)), None)
                    .expect("register the connection's handler");
            })),
            None,
        )?;
        let client = {
            let j = jobs.clone();
            thread::Builder::new()
                .name("client".into())
                .spawn(move || -> io::Result<()> {
                    let mut s = TcpStream::connect(addr)?;
                    j.say(&format!("connected to {addr}, sending two lines"));
                    s.write_all(b"hello from the client thread\n")?;
                    s.write_all(b"goodbye\n")?;
                    Ok(()) // dropping `s` hangs up
                })?
        };

        // 4. GLib's own sources share the loop: a GLib timeout, and a safety net so that the
        // example can never hang.
        let j = jobs.clone();
        glib::timeout_add_once(Duration::from_millis(150), move || {
            j.say("GLib timeout: the main loop also runs plain GLib sources");
        });
        let safety_loop = main_loop.clone();
        let safety = glib::timeout_add(Duration::from_secs(10), move || {
            eprintln!("glib_loop: gave up after 10 s");
            safety_loop.quit();
            ControlFlow::Break
        });

        jobs.say("running the GLib main loop");
        main_loop.run();
        jobs.say("the GLib main loop returned");

        // Clean up: nothing is left registered, and the source lets the context go.
        let left = jobs.left.load(Ordering::SeqCst);
        worker.join().expect("worker thread");
        client.join().expect("client thread")?;
        if left == 0 {
            safety.remove(); // it did not fire, so it is still attached
        }
        timer_slot.lock().unwrap().take();
        let _ = ctx.set_fd_handler(listener_fd, None, None);
        source.destroy();
        drop(source);
        println!(
            "done: {} jobs left, {} descriptors still registered",
            left,
            ctx.registered_fds().len()
        );
        if left == 0 {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::TimedOut, "jobs left undone"))
        }
    }
}
