//! The address the `switchboard` binary listens on, read from its `listening` log line
//! (JSON): a child started on port 0 tells its port this way. Shared with tests/drain.rs.

/// The address in `line`, if `line` is the JSON `listening` line.
pub fn listening_address(line: &str) -> Option<String> {
    let entry: serde_json::Value = serde_json::from_str(line).ok()?;
    // Flattened (the binary's format) or nested under `fields`.
    let fields = if entry["fields"].is_object() {
        &entry["fields"]
    } else {
        &entry
    };
    (fields["message"] == "listening")
        .then(|| fields["address"].as_str().map(str::to_owned))
        .flatten()
}
