//! The load tool's short mode (as CI runs it): it must run to the end and print every
//! number. No number is checked against a target here: the machine is shared.

use std::process::Command;

#[test]
fn short_run_prints_every_measurement() -> anyhow::Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-load"))
        .arg("--short")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for prefix in [
        "throughput callers=64 path=direct round=1 rps=",
        "throughput callers=64 path=rest round=1 rps=",
        "throughput callers=64 path=mcp round=1 rps=",
        "throughput callers=64 path=direct-stateless round=1 rps=",
        "throughput callers=64 path=mcp-stateless round=1 rps=",
        "throughput callers=1 path=direct round=1 rps=",
        "cpu callers=64 path=rest round=1 gateway_us_per_call=",
        "cpu callers=64 path=mcp round=1 gateway_us_per_call=",
        "ratio callers=64 path=rest rounds=1 throughput_vs_direct=",
        "ratio callers=1 path=mcp rounds=1 throughput_vs_direct=",
        "ratio callers=64 path=rest rounds=1 throughput_vs_direct_stateless=",
        "ratio callers=64 path=mcp-stateless rounds=1 throughput_vs_direct=",
        "throughput callers=1 path=hop round=1 rps=",
        "floor callers=1 path=hop rounds=1 p50_ms=",
        "cold first_call_ms=",
        "burst calls=100 tool_ms=100 all_done_ms=",
        "startup ready_ms=",
        "memory idle_tenants=",
        "memory active_tenants=",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{stdout}"));
        let first = line[prefix.len()..].split_whitespace().next().unwrap_or("");
        let value: f64 = first
            .parse()
            .unwrap_or_else(|_| panic!("not a number after {prefix:?}: {line}"));
        assert!(value.is_finite(), "{line}");
    }
    // The burst's baseline and its first run are on the same line, after its median.
    let burst = stdout
        .lines()
        .find(|l| l.starts_with("burst "))
        .unwrap_or_else(|| panic!("no burst line in:\n{stdout}"));
    for field in ["all_done_ms=", "first_ms=", "direct_ms="] {
        let value: f64 = burst
            .split_whitespace()
            .find_map(|word| word.strip_prefix(field))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number for {field:?} in {burst}"));
        assert!(
            value >= 100.0,
            "a burst of 100 ms calls took {value} ms: {burst}"
        );
    }
    assert!(
        !stdout.contains("rps=0 "),
        "a path answered nothing:\n{stdout}"
    );
    // Every call of every path answered, as a success: a failing path is not a number.
    for line in stdout.lines().filter(|l| l.starts_with("throughput ")) {
        assert_eq!(field(line, "errors="), 0.0, "{line}");
        assert!(field(line, "requests=") > 0.0, "{line}");
    }
    // The gateway's memory was read, in each state.
    for (prefix, rss) in [
        ("memory empty_rss_mb=", "empty_rss_mb="),
        ("memory idle_tenants=", "rss_mb="),
        ("memory active_tenants=", "rss_mb="),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{stdout}"));
        assert!(field(line, rss) > 1.0, "{line}");
    }
    Ok(())
}

/// The number after `name` among the words of `line`.
fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number for {name:?} in {line}"))
}
