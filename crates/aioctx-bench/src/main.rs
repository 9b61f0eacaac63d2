//! `aioctx-bench`: aioctx against tokio, calloop, mio, glib and a raw
//! eventfd + epoll floor, workload by workload.
//!
//! Each workload runs on every system that has the feature, interleaved round
//! by round; the table reports the median and p99 (ns; throughput workloads
//! report ns per operation) and the ratio aioctx / that system. `--json`
//! writes the rows, `--chart` an SVG of the ratios.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

mod floor;
mod harness;
mod report;
mod workloads;

use harness::Scale;
use workloads::Report;

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark aioctx against tokio, calloop, mio, glib and a raw epoll floor"
)]
struct Args {
    /// Small sizes and few rounds: the whole run takes under a minute.
    #[arg(long)]
    quick: bool,

    /// Write the rows as a JSON array to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Write an SVG chart of the aioctx / peer ratios to FILE.
    #[arg(long, value_name = "FILE", default_value = "docs/bench.svg")]
    chart: PathBuf,

    /// Do not write the chart.
    #[arg(long)]
    no_chart: bool,

    /// Run only the workloads whose name contains one of these (comma
    /// separated): deferred, cross-thread, coalescing, timers, fd, thread-pool.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    only: Vec<String>,

    /// Run only these systems (comma separated: aioctx, floor, tokio,
    /// calloop, mio, glib, aioctx-poll, spin), e.g. to profile or strace one
    /// of them.
    #[arg(long, value_delimiter = ',', value_name = "SYSTEMS")]
    systems: Vec<String>,

    /// The polling window of the `aioctx-poll` system in workload 2c, in ns
    /// (QEMU's IOThread default: 32768).
    #[arg(long, value_name = "NS", default_value_t = 32_768)]
    poll_max_ns: u64,

    /// Divide every size by N and measure 2 rounds (for smoke tests; the
    /// numbers are meaningless).
    #[arg(long, value_name = "N", default_value_t = 1, hide = true)]
    shrink: u64,
}

fn main() {
    let args = Args::parse();
    let scale = Scale {
        quick: args.quick,
        shrink: args.shrink,
    };
    harness::only_systems(args.systems.clone());
    workloads::cross_thread::set_poll_max_ns(args.poll_max_ns);
    let started = Instant::now();
    let mut report = Report::default();
    for w in workloads::ALL {
        if !args.only.is_empty() && !args.only.iter().any(|o| w.name.contains(o.as_str())) {
            continue;
        }
        let t = Instant::now();
        (w.run)(scale, &mut report);
        eprintln!("[{}: {:.1} s]", w.name, t.elapsed().as_secs_f64());
    }
    print!("{}", report::table(&report));
    println!(
        "\nMode: {}; total time {:.1} s",
        if args.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.json {
        report::write_json(&report.rows, path).unwrap_or_else(|e| {
            eprintln!("cannot write {}: {e}", path.display());
            std::process::exit(1);
        });
    }
    if !args.no_chart {
        report::write_chart(&report.rows, &args.chart).unwrap_or_else(|e| {
            eprintln!("cannot write {}: {e}", args.chart.display());
            std::process::exit(1);
        });
    }
}
