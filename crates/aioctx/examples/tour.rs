//! A tour of aioctx: each step does real work on one context and prints what happened.
//!
//! Run it with `cargo run --release --example tour`.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aioctx::{clock_get_ns, virtual_clock, AioContext, ClockType, SCALE_MS, SCALE_NS};

#[cfg(unix)]
use std::os::fd::AsRawFd as AsDescriptor;
#[cfg(windows)]
use std::os::windows::io::AsRawSocket as AsDescriptor;

fn descriptor(s: &TcpStream) -> aioctx::RawFd {
    #[cfg(unix)]
    return s.as_raw_fd();
    #[cfg(windows)]
    return s.as_raw_socket();
}

fn main() -> io::Result<()> {
    let ctx = AioContext::new()?;
    println!("aioctx tour: one AioContext, backend {:?}\n", ctx.backend());

    // 1. A bottom half scheduled from another thread wakes a blocked poll.
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    // Dropping a Bh deletes it (QEMU's qemu_bh_delete), so this thread keeps it alive until it
    // has run.
    let bh = Arc::new(ctx.bh_new(move || r.store(true, Ordering::SeqCst)));
    let start = Instant::now();
    let b = bh.clone();
    let scheduler = thread::spawn(move || b.schedule());
    while !ran.load(Ordering::SeqCst) {
        ctx.poll(true);
    }
    scheduler.join().unwrap();
    println!(
        "1. BH scheduled from another thread ran on the loop thread after {:?}",
        start.elapsed()
    );

    // 2. A timer never fires early; measure how late it is.
    let fired_at = Arc::new(Mutex::new(None));
    let f = fired_at.clone();
    let timer = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
        *f.lock().unwrap() = Some(clock_get_ns(ClockType::Realtime));
    });
    let deadline = clock_get_ns(ClockType::Realtime) + 5 * SCALE_MS;
    timer.modify_ns(deadline);
    while fired_at.lock().unwrap().is_none() {
        ctx.poll(true);
    }
    let late = fired_at.lock().unwrap().unwrap() - deadline;
    println!("2. 5 ms realtime timer fired {late} ns after its deadline (never before)");

    // 3. fd handlers: a loopback TCP echo, level-triggered, non-blocking.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    server.set_nonblocking(true)?;
    let server_fd = descriptor(&server);
    let echoed = Arc::new(AtomicUsize::new(0));
    let e = echoed.clone();
    let server = Mutex::new(server);
    ctx.set_fd_handler(
        server_fd,
        Some(Box::new(move || {
            let mut s = server.lock().unwrap();
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => {
                    s.write_all(&buf[..n]).unwrap();
                    e.fetch_add(n, Ordering::SeqCst);
                }
                _ => {}
            }
        })),
        None,
    )?;
    client.write_all(b"hello, aioctx")?;
    while echoed.load(Ordering::SeqCst) < 13 {
        ctx.poll(true);
    }
    let mut back = [0u8; 13];
    client.read_exact(&mut back)?;
    println!(
        "3. fd handler echoed {:?} over loopback TCP",
        String::from_utf8_lossy(&back)
    );
    ctx.set_fd_handler(server_fd, None, None)?;

    // 4. The thread pool: work on a worker, completion back on the loop thread.
    let loop_thread = thread::current().id();
    let result = Arc::new(Mutex::new(None));
    let r = result.clone();
    ctx.thread_pool().submit_aio(
        || (1..=20u64).product::<u64>(),
        move |v| *r.lock().unwrap() = Some((v, thread::current().id() == loop_thread)),
    );
    while result.lock().unwrap().is_none() {
        ctx.poll(true);
    }
    let (value, on_loop) = result.lock().unwrap().take().unwrap();
    println!("4. thread pool computed 20! = {value:?}; completion on the loop thread: {on_loop}");

    // 5. async/await on the same loop: a task sleeps, then offloads work to the pool.
    let pool = ctx.thread_pool();
    let task = ctx.spawn(async move {
        aioctx::sleep(Duration::from_millis(2)).await;
        pool.run(|| "computed in the pool, awaited in a task").await
    });
    println!("5. async task: {}", ctx.block_on(task).unwrap());

    // 6. Nested loops: a BH waits for a timer by polling the same context from inside.
    let inner_done = Arc::new(AtomicBool::new(false));
    let d = inner_done.clone();
    let weak = ctx.downgrade();
    ctx.bh_schedule_oneshot(move || {
        let ctx = weak.upgrade().unwrap();
        let tick = Arc::new(AtomicBool::new(false));
        let t = tick.clone();
        let timer = ctx.timer_new(ClockType::Realtime, SCALE_MS, move || {
            t.store(true, Ordering::SeqCst)
        });
        timer.modify(clock_get_ns(ClockType::Realtime) / SCALE_MS + 1);
        let mut nested_polls = 0;
        while !tick.load(Ordering::SeqCst) {
            ctx.poll(true);
            nested_polls += 1;
        }
        d.store(true, Ordering::SeqCst);
        println!(
            "6. a BH waited for a timer with {nested_polls} nested poll(s) of its own context"
        );
    });
    while !inner_done.load(Ordering::SeqCst) {
        ctx.poll(true);
    }

    // 7. The virtual clock: an hour passes instantly when the program says so.
    virtual_clock::stop();
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let hour = ctx.timer_new(ClockType::Virtual, SCALE_MS, move || {
        f.store(true, Ordering::SeqCst)
    });
    hour.modify(clock_get_ns(ClockType::Virtual) / SCALE_MS + 3_600_000);
    let before = Instant::now();
    ctx.poll(false);
    let early = fired.load(Ordering::SeqCst);
    virtual_clock::advance(3_600 * 1_000_000_000);
    while !fired.load(Ordering::SeqCst) {
        ctx.poll(true);
    }
    println!(
        "7. a 1-hour virtual-clock timer: fired before advancing: {early}; after advancing: true, \
         in {:?} of real time",
        before.elapsed()
    );

    println!("\nDone: every step above ran on one AioContext, polled by this thread.");
    Ok(())
}
