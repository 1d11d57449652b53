use std::path::PathBuf;
use anyhow::Result;
use parex_engine::EngineKind;
use parex_workloads::{mainnet, verify};

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(mainnet::builtin_dir);
    let src = mainnet::Source::open(&dir)?;
    let (mut pass, mut fail) = (0, 0);
    for (n, b) in src.load_all() {
        let b = match b { Ok(b) => b, Err(e) => { println!("{n} ERROR {e}"); fail += 1; continue; } };
        match verify::check_block(&b, EngineKind::Sequential, 1) {
            Ok(c) => { if c.passed() { pass += 1 } else { fail += 1 }; println!("{n} {} {:?} {:?} {}", c.passed(), c.receipts_root_matches, c.elapsed, c.mismatches(&b)); }
            Err(e) => { fail += 1; println!("{n} ERROR {e}"); }
        }
    }
    println!("{pass} passed, {fail} failed");
    Ok(())
}
