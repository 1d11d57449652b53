//! Ethereum mainnet's hardfork schedule.

use revm::primitives::hardfork::SpecId;

/// The EVM rules (revm `SpecId`) in force for a mainnet block.
pub fn spec_for_block(number: u64, timestamp: u64) -> SpecId {
    const BY_TIMESTAMP: [(u64, SpecId); 3] = [
        (1_746_612_311, SpecId::PRAGUE),
        (1_710_338_135, SpecId::CANCUN),
        (1_681_338_455, SpecId::SHANGHAI),
    ];
    const BY_NUMBER: [(u64, SpecId); 10] = [
        (15_537_394, SpecId::MERGE),
        (12_965_000, SpecId::LONDON),
        (12_244_000, SpecId::BERLIN),
        (9_069_000, SpecId::ISTANBUL),
        (7_280_000, SpecId::PETERSBURG),
        (4_370_000, SpecId::BYZANTIUM),
        (2_675_000, SpecId::SPURIOUS_DRAGON),
        (2_463_000, SpecId::TANGERINE),
        (1_150_000, SpecId::HOMESTEAD),
        (0, SpecId::FRONTIER),
    ];
    if number >= 15_537_394
        && let Some((_, spec)) = BY_TIMESTAMP.iter().find(|(t, _)| timestamp >= *t)
    {
        return *spec;
    }
    BY_NUMBER
        .iter()
        .find(|(n, _)| number >= *n)
        .map(|(_, s)| *s)
        .unwrap_or(SpecId::FRONTIER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_boundaries() {
        assert_eq!(spec_for_block(46_147, 0), SpecId::FRONTIER);
        assert_eq!(spec_for_block(2_674_999, 0), SpecId::TANGERINE);
        assert_eq!(spec_for_block(2_675_000, 0), SpecId::SPURIOUS_DRAGON);
        assert_eq!(spec_for_block(4_369_999, 0), SpecId::SPURIOUS_DRAGON);
        assert_eq!(spec_for_block(4_370_000, 0), SpecId::BYZANTIUM);
        assert_eq!(spec_for_block(15_537_393, 1_663_224_162), SpecId::LONDON);
        assert_eq!(spec_for_block(15_537_394, 1_663_224_179), SpecId::MERGE);
        assert_eq!(spec_for_block(17_034_870, 1_681_338_455), SpecId::SHANGHAI);
        assert_eq!(spec_for_block(19_426_587, 1_710_338_135), SpecId::CANCUN);
        assert_eq!(spec_for_block(22_431_084, 1_746_612_311), SpecId::PRAGUE);
    }
}
