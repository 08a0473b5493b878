//! The benchmark runs (tiny sizes) and reports every figure, so it cannot rot. Its numbers
//! are not judged here: timings belong to `crmsync bench`, not to tests.

/// Runs `crmsync --json bench ARGS` and returns its report.
async fn bench(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_crmsync"))
        .args(["--json", "bench"])
        .args(args)
        .env("CRMSYNC_LOG", "error")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_smoke_run_reports_every_figure() {
    let report = bench(&["--smoke"]).await;
    let size = &report["sizes"][0];
    assert_eq!(size["contacts"], 1000);
    for figure in ["/load/per_second", "/rebuild_100/per_second", "/rebuild_100/raw_per_second", "/catch_up/per_second"]
    {
        assert!(size.pointer(figure).and_then(|v| v.as_f64()).is_some_and(|v| v > 0.0), "{figure} in {size}");
    }
    // The rebuild replayed every record the data set has, and the main's administrator.
    assert_eq!(size["rebuild_100"]["records"].as_u64(), size["load"]["records"].as_u64().map(|n| n + 1));
    // The tenth (one state of ten) holds fewer records than the whole.
    assert!(size["rebuild_10"]["records"].as_u64().unwrap() < size["rebuild_100"]["records"].as_u64().unwrap() / 2);
    for key in ["latency_ms", "remote_to_remote_latency_ms"] {
        let p99 = size[key]["p99"].as_f64().unwrap_or(-1.0);
        assert!(p99 > 0.0 && p99 >= size[key]["p50"].as_f64().unwrap(), "{key} in {size}");
    }
    for sets in ["sets_10", "sets_100"] {
        let c = &report["commit"][sets];
        for k in ["write_path_per_second", "http_per_second", "raw_publish_per_second"] {
            assert!(c[k].as_f64().is_some_and(|v| v > 0.0), "{sets}.{k} in {c}");
        }
    }
    assert!(report["commit"]["routing_us_per_change_100_sets"]["total"].as_f64().is_some());
    // Every target gets a verdict beside its measured value.
    let targets = report["targets"].as_array().unwrap();
    assert!(targets.len() >= 5, "{targets:?}");
    assert!(targets.iter().all(|t| t["met"].is_boolean() && t["value"].is_string()), "{targets:?}");
}

/// `--commit-only --nats-sync-always`: the commit figures alone, on a nats-server that writes
/// every message to disk before acknowledging it, and the report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_measures_commits_alone_on_a_server_that_syncs_every_message() {
    let report = bench(&["--smoke", "--commit-only", "--nats-sync-always"]).await;
    assert_eq!(report["nats_sync_always"], true);
    assert_eq!(report["sizes"].as_array().map(Vec::len), Some(0), "no data sets: {report}");
    assert!(report["commit"]["sets_10"]["write_path_per_second"].as_f64().is_some_and(|v| v > 0.0), "{report}");
}

/// `--scale`: many sets and remotes on one server, each remote with its consumer; the remotes
/// of one set run and every figure is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_simulation_reports_consumers_memory_routing_and_latency() {
    let report = bench(&["--smoke", "--scale"]).await;
    let scale = &report["scale"];
    assert_eq!((scale["sets"].as_u64(), scale["remotes"].as_u64()), (Some(20), Some(100)), "{report}");
    for figure in ["/register_seconds", "/nats_memory_bytes", "/main_memory_bytes", "/latency_ms/p99"] {
        assert!(scale.pointer(figure).and_then(|v| v.as_f64()).is_some_and(|v| v > 0.0), "{figure} in {scale}");
    }
    assert!(report["routing_us_per_change_20_sets"]["total"].as_f64().is_some_and(|v| v > 0.0), "{report}");
}
