//! Helpers shared by the engine equivalence tests: where two block outcomes differ.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use parex_core::outcome::EvmBlockOutcome;

/// A description of the first differences between `expected` (sequential) and `actual`:
/// the first transaction whose outcome differs, and the state keys whose final values
/// differ. Empty when the outcomes are equal.
pub fn describe_difference(expected: &EvmBlockOutcome, actual: &EvmBlockOutcome) -> String {
    let mut out = String::new();
    if expected.tx_outcomes.len() != actual.tx_outcomes.len() {
        let _ = writeln!(
            out,
            "transaction count: sequential {} vs {}",
            expected.tx_outcomes.len(),
            actual.tx_outcomes.len()
        );
    }
    if let Some(i) = expected
        .tx_outcomes
        .iter()
        .zip(&actual.tx_outcomes)
        .position(|(a, b)| a != b)
    {
        let _ = writeln!(
            out,
            "first differing transaction: #{i}\n  sequential: {:?}\n  engine:     {:?}",
            expected.tx_outcomes[i], actual.tx_outcomes[i]
        );
    }
    let a: BTreeMap<_, _> = expected.state_diff.iter().map(|(k, v)| (k, v)).collect();
    let b: BTreeMap<_, _> = actual.state_diff.iter().map(|(k, v)| (k, v)).collect();
    if a.len() != expected.state_diff.len() || b.len() != actual.state_diff.len() {
        let _ = writeln!(
            out,
            "a state diff lists a key twice (sequential {} entries / {} keys, engine {} / {})",
            expected.state_diff.len(),
            a.len(),
            actual.state_diff.len(),
            b.len()
        );
    }
    let mut shown = 0;
    for (key, va) in &a {
        if shown >= 8 {
            break;
        }
        match b.get(key) {
            Some(vb) if vb == va => {}
            Some(vb) => {
                shown += 1;
                let _ = writeln!(
                    out,
                    "state {key:?}\n  sequential: {va:?}\n  engine:     {vb:?}"
                );
            }
            None => {
                shown += 1;
                let _ = writeln!(out, "state {key:?} only in sequential: {va:?}");
            }
        }
    }
    for (key, vb) in &b {
        if shown >= 8 {
            break;
        }
        if !a.contains_key(key) {
            shown += 1;
            let _ = writeln!(out, "state {key:?} only in engine: {vb:?}");
        }
    }
    out
}
