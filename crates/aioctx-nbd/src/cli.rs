//! Command line interface. Flag names follow `qemu-nbd`.

use std::path::PathBuf;

use clap::Parser;

const EXAMPLES: &str = "\
Examples:
  Serve a scratch disk (sparse 1 GiB temporary image, deleted on exit):
    aioctx-nbd
    qemu-img info nbd://127.0.0.1:10809

  Serve an existing raw image read-only on another port:
    aioctx-nbd -r -p 10810 disk.img

  Serve on a Unix socket, keep running after clients leave:
    aioctx-nbd -t -k /tmp/nbd.sock disk.img
    nbdinfo 'nbd+unix:///?socket=/tmp/nbd.sock'

  Four I/O threads, up to 32 clients, export named 'disk':
    aioctx-nbd --threads 4 -e 32 -x disk -t disk.img
    qemu-io -f raw nbd://127.0.0.1:10809/disk -c 'read -P 0 0 4k'";

/// The default `--poll-max-ns`: at queue depth 1 over loopback on a VM the
/// next request arrives 40-60 µs after a reply (the client's own wake-up),
/// beyond QEMU's IOThread default of 32 µs.
pub const DEFAULT_POLL_MAX_NS: u64 = 65_536;

/// Serve a raw disk image over the NBD protocol.
#[derive(Debug, Clone, Parser)]
#[command(name = "aioctx-nbd", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// Raw image to serve. Without it, a fresh sparse 1 GiB temporary
    /// image is served and deleted on exit.
    pub file: Option<PathBuf>,

    /// Address to listen on. Use 0.0.0.0 or :: to listen on all
    /// interfaces.
    #[arg(
        short = 'b',
        long = "bind",
        value_name = "ADDR",
        default_value = "127.0.0.1"
    )]
    pub bind: String,

    /// TCP port to listen on (0 picks a free one).
    #[arg(short = 'p', long, value_name = "PORT", default_value_t = 10809)]
    pub port: u16,

    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", value_name = "PATH", conflicts_with_all = ["bind", "port"])]
    pub socket: Option<PathBuf>,

    /// Export read-only: writes, trims and write-zeroes fail with EPERM.
    #[arg(short = 'r', long)]
    pub read_only: bool,

    /// Name of the export clients must ask for.
    #[arg(short = 'x', long, value_name = "NAME", default_value = "")]
    pub export_name: String,

    /// Description of the export shown to clients that ask.
    #[arg(short = 'D', long, value_name = "TEXT", default_value = "")]
    pub description: String,

    /// Maximum number of clients connected at once (further ones wait in
    /// the listen backlog).
    #[arg(short = 'e', long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub shared: u32,

    /// Keep serving after the last client disconnects (by default the
    /// server exits then).
    #[arg(short = 't', long)]
    pub persistent: bool,

    /// Number of I/O threads, each running its own event loop;
    /// connections are spread over them.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,

    /// Busy-polling window of each I/O thread, in ns (QEMU's IOThread
    /// property poll-max-ns): after each event a thread spins up to this
    /// long for the next before it sleeps, trading CPU for latency (a
    /// wake-up through the kernel costs tens of µs on a VM). Adaptive: a
    /// thread whose clients go quiet stops spinning. 0 turns it off.
    #[arg(long, value_name = "NS", env = "AIOCTX_POLL_MAX_NS",
          default_value_t = DEFAULT_POLL_MAX_NS)]
    pub poll_max_ns: u64,

    /// Seconds a client has to finish the handshake before it is
    /// disconnected.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout: u64,

    /// Copy all read data through a buffer instead of sending large cached
    /// reads straight from the page cache with sendfile(2).
    #[arg(long)]
    pub no_sendfile: bool,

    /// Smallest read sent with sendfile(2) (when its range is cached);
    /// smaller ones are copied, which costs fewer system calls.
    #[arg(long, value_name = "BYTES", default_value_t = crate::export::SENDFILE_MIN_DEFAULT,
          conflicts_with = "no_sendfile")]
    pub sendfile_min: usize,

    /// Read every write payload into a buffer instead of moving large
    /// page-aligned ones from the socket into the image with splice(2).
    #[arg(long)]
    pub no_splice: bool,

    /// An inline write (or a piece of a spliced payload) slower than this
    /// counts as blocked and sends writes to workers for a while. For
    /// tests: 0 makes every one count.
    #[arg(long, value_name = "NS", default_value_t = 1_000_000, hide = true)]
    pub inline_write_slow_ns: u64,

    /// More logging (-v: info, -vv: debug, -vvv: trace). RUST_LOG
    /// overrides.
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_loopback() {
        let c = Cli::parse_from(["aioctx-nbd"]);
        assert_eq!(c.bind, "127.0.0.1");
        assert_eq!(c.port, 10809);
        assert!(c.file.is_none() && !c.persistent && !c.read_only);
        if std::env::var_os("AIOCTX_POLL_MAX_NS").is_none() {
            assert_eq!(c.poll_max_ns, DEFAULT_POLL_MAX_NS);
        }
        assert!(!c.no_sendfile);
        assert!(!c.no_splice);
        assert_eq!(c.sendfile_min, crate::export::SENDFILE_MIN_DEFAULT);
    }

    #[test]
    fn qemu_nbd_style_flags() {
        let c = Cli::parse_from([
            "aioctx-nbd",
            "-r",
            "-t",
            "-x",
            "disk",
            "-e",
            "4",
            "-p",
            "0",
            "--threads",
            "2",
            "--poll-max-ns",
            "0",
            "-vv",
            "img",
        ]);
        assert!(c.read_only && c.persistent);
        assert_eq!((c.export_name.as_str(), c.shared, c.port), ("disk", 4, 0));
        assert_eq!((c.threads, c.verbose, c.poll_max_ns), (2, 2, 0));
        assert!(Cli::try_parse_from(["aioctx-nbd", "-k", "/s", "-p", "1"]).is_err());
        assert!(Cli::try_parse_from(["aioctx-nbd", "-e", "0"]).is_err());
        let c = Cli::parse_from(["aioctx-nbd", "--no-sendfile"]);
        assert!(c.no_sendfile);
        let c = Cli::parse_from(["aioctx-nbd", "--no-splice"]);
        assert!(c.no_splice);
        let c = Cli::parse_from(["aioctx-nbd", "--sendfile-min", "65536"]);
        assert_eq!(c.sendfile_min, 65536);
    }
}
