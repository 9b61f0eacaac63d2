//! `aioctx-nbd`: serve a raw image over NBD. See `aioctx-nbd --help`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aioctx_nbd::cli::Cli;
use aioctx_nbd::export::Export;
use aioctx_nbd::handshake::ExportInfo;
use aioctx_nbd::server::{Config, Listener, Server};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Size of the image served when no file is given.
const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aioctx-nbd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let (export, what) = match &cli.file {
        Some(path) => {
            let e = Export::open(path, cli.read_only)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            (e, path.display().to_string())
        }
        None => {
            let dir = std::env::temp_dir();
            let (e, _) = Export::temporary(&dir, DEFAULT_IMAGE_SIZE).map_err(|e| {
                format!("cannot create a temporary image in {}: {e}", dir.display())
            })?;
            (e, "a temporary sparse 1 GiB image".to_string())
        }
    };
    export.set_sendfile_min((!cli.no_sendfile).then_some(cli.sendfile_min));
    export.set_splice_writes(!cli.no_splice);
    export.set_inline_write_slow(Duration::from_nanos(cli.inline_write_slow_ns));
    let read_only = cli.read_only;
    let listener = match &cli.socket {
        Some(path) => Listener::unix(path.clone())
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?,
        None => Listener::tcp(&cli.bind, cli.port)
            .map_err(|e| format!("cannot listen on {}:{}: {e}", cli.bind, cli.port))?,
    };
    let uri = listener.uri(&cli.export_name).map_err(|e| e.to_string())?;
    let info = ExportInfo {
        name: cli.export_name.clone(),
        description: cli.description.clone(),
        size: export.size(),
        read_only,
    };
    let config = Config {
        info,
        threads: cli.threads as usize,
        max_clients: cli.shared as usize,
        persistent: cli.persistent,
        handshake_timeout: Duration::from_secs(cli.handshake_timeout),
        poll_max_ns: cli.poll_max_ns,
    };
    let size = export.size();
    let server = Server::new(config, Arc::new(export), listener);
    // Tests and scripts wait for this line; a closed stdout is no reason
    // to stop serving.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "aioctx-nbd: serving {what} ({size} bytes{}) at {uri}",
        if read_only { ", read-only" } else { "" }
    );
    let _ = writeln!(out, "Try: qemu-img info {uri}");
    let _ = out.flush();
    drop(out);
    server.run().map_err(|e| e.to_string())
}
