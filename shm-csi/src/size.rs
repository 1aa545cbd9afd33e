//! Strict parsing of volume sizes (`size` attribute, `--default-size`,
//! `--max-size`): a positive integer with an optional binary (`Ki`, `Mi`,
//! `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`) suffix, as in Kubernetes
//! quantities. No fractions, signs, exponents or spaces.

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("size {0:?} must start with a digit (e.g. 64Mi, 1Gi, 4096)")]
    NotANumber(String),
    #[error("size {0:?} has an unknown unit (use Ki, Mi, Gi, Ti, k, M, G, T or none for bytes)")]
    Unit(String),
    #[error("size {0:?} must be greater than zero")]
    Zero(String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses `64Mi`, `1Gi`, `512k`, `4096` into bytes.
pub fn parse(s: &str) -> Result<u64, SizeError> {
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::NotANumber(s.to_owned()));
    }
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(SizeError::Unit(s.to_owned())),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_owned()))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| SizeError::Overflow(s.to_owned()))?;
    if bytes == 0 {
        return Err(SizeError::Zero(s.to_owned()));
    }
    Ok(bytes)
}

/// Formats bytes the way `parse` reads them, with the largest exact binary unit.
pub fn format(bytes: u64) -> String {
    for (unit, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes >= 1 << shift && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_quantities() {
        assert_eq!(parse("64Mi"), Ok(64 << 20));
        assert_eq!(parse("1Gi"), Ok(1 << 30));
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("512k"), Ok(512_000));
        assert_eq!(parse("2M"), Ok(2_000_000));
        assert_eq!(parse("1Ti"), Ok(1 << 40));
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(parse(""), Err(SizeError::Empty));
        for bad in ["Mi", "-1Mi", "+1", " 1Mi", "1.5Gi", "1e6"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("64MB"), Err(SizeError::Unit("64MB".into())));
        assert_eq!(parse("64mi"), Err(SizeError::Unit("64mi".into())));
        assert_eq!(parse("1 Gi"), Err(SizeError::Unit("1 Gi".into())));
        assert_eq!(parse("0Mi"), Err(SizeError::Zero("0Mi".into())));
        assert_eq!(
            parse("99999999999999999999"),
            Err(SizeError::Overflow("99999999999999999999".into()))
        );
        assert_eq!(
            parse("20000000Ti"),
            Err(SizeError::Overflow("20000000Ti".into()))
        );
        assert!(
            parse("1.5Gi")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
    }

    #[test]
    fn formats_back() {
        assert_eq!(format(64 << 20), "64Mi");
        assert_eq!(format(1 << 30), "1Gi");
        assert_eq!(format(1000), "1000");
        assert_eq!(format(3 << 10), "3Ki");
    }
}
