//! Runs the whole benchmark with tiny sizes and checks its outputs are
//! well-formed. The numbers themselves mean nothing here.

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn tiny_run_writes_well_formed_json_and_chart() {
    let dir = std::env::temp_dir().join(format!("aioctx-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let chart = dir.join("bench.svg");

    let out = Command::new(env!("CARGO_BIN_EXE_aioctx-bench"))
        .args(["--quick", "--shrink", "50", "--json"])
        .arg(&json)
        .arg("--chart")
        .arg(&chart)
        .output()
        .expect("run aioctx-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "aioctx-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("aioctx/this"),
        "no table on stdout:\n{stdout}"
    );

    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().expect("a JSON array");
    let systems = [
        "aioctx",
        "floor",
        "tokio",
        "calloop",
        "mio",
        "glib",
        "aioctx-poll",
        "spin",
    ];
    let mut workloads = BTreeSet::new();
    let mut with_aioctx = BTreeSet::new();
    for row in rows {
        let obj = row.as_object().expect("rows are objects");
        let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["workload", "system", "median_ns", "p99_ns"]),
            "{row}"
        );
        let workload = obj["workload"].as_str().expect("workload is a string");
        let system = obj["system"].as_str().expect("system is a string");
        let median = obj["median_ns"].as_f64().expect("median_ns is a number");
        let p99 = obj["p99_ns"].as_f64().expect("p99_ns is a number");
        assert!(!workload.is_empty());
        assert!(systems.contains(&system), "unknown system {system}");
        assert!(median >= 0.0 && p99 >= median, "{row}");
        workloads.insert(workload.to_string());
        if system == "aioctx" {
            with_aioctx.insert(workload.to_string());
        }
    }
    // Every workload of the issue is there, and aioctx takes part in each.
    for prefix in [
        "1 ", "2a ", "3 ", "4a ", "4b ", "4c ", "5a ", "5b ", "5c ", "6 ",
    ] {
        assert!(
            workloads.iter().any(|w| w.starts_with(prefix)),
            "no workload {prefix}: {workloads:?}"
        );
    }
    assert_eq!(workloads, with_aioctx);

    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("vs tokio"),
        "bad SVG"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
