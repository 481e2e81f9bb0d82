//! Byte sizes as people write them in flags and files: `512MiB`, `1.5GiB`, `64GB`.

/// Parse a positive byte size: `1073741824`, `512MiB`, `1.5GiB`, `64KiB`, `1GB`. Binary units
/// (KiB, MiB, GiB, TiB) and decimal ones (KB, MB, GB, TB); a bare `G` is refused as ambiguous.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    const UNITS: &str = "B, KiB, MiB, GiB, TiB, KB, MB, GB or TB";
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u @ ("K" | "M" | "G" | "T" | "k" | "m" | "g" | "t") => {
            let u = u.to_ascii_uppercase();
            return Err(format!("{s:?} is ambiguous: write {num}{u}iB (binary) or {num}{u}B (decimal)"));
        }
        u => return Err(format!("unknown unit {u:?} in {s:?}: expected {UNITS}")),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected a number and one of {UNITS}"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {s:?} is too large"));
    }
    if bytes < 1.0 {
        return Err(format!("size {s:?} must be at least 1 byte"));
    }
    Ok(bytes.round() as u64)
}

/// A byte count for people, in the binary units the size flags take: `1.50 GiB`, `640.0 KiB`.
pub fn human_bytes(b: f64) -> String {
    const UNITS: [(&str, f64); 4] =
        [("TiB", (1u64 << 40) as f64), ("GiB", (1u64 << 30) as f64), ("MiB", (1u64 << 20) as f64), ("KiB", 1024.0)];
    for (unit, size) in UNITS {
        if b >= size {
            let v = b / size;
            return if v >= 100.0 { format!("{v:.0} {unit}") } else { format!("{v:.2} {unit}") };
        }
    }
    format!("{b:.0} B")
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1GB").unwrap(), 1_000_000_000);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(super::human_bytes((3u64 << 29) as f64), "1.50 GiB");
        assert_eq!(super::human_bytes(640.0 * 1024.0), "640 KiB");
        assert_eq!(super::human_bytes(17.0), "17 B");
        assert_eq!(parse_bytes("2TB").unwrap(), 2_000_000_000_000);
        for (bad, says) in [
            ("0", "at least 1 byte"),
            ("0GiB", "at least 1 byte"),
            ("10G", "ambiguous: write 10GiB (binary) or 10GB (decimal)"),
            ("1.2.3GiB", "invalid size"),
            ("99999999999TiB", "too large"),
            ("5 parsecs", "expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"),
        ] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
