//! Receipts root and logs bloom of a block, the way each fork defines receipts.

use alloy_consensus::{Eip658Value, Receipt, ReceiptEnvelope, ReceiptWithBloom};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{B256, Bloom};
use parex_core::TxOutcome;
use revm::primitives::hardfork::SpecId;

/// The logs bloom of a block: the union of its receipts' blooms.
pub fn logs_bloom(outcomes: &[TxOutcome]) -> Bloom {
    let mut bloom = Bloom::ZERO;
    for o in outcomes.iter().filter(|o| !o.status.is_invalid()) {
        bloom.accrue_logs(&o.logs);
    }
    bloom
}

/// The receipts root, or `None` before Byzantium, whose receipts carry an intermediate
/// state root that execution alone cannot produce. Invalid transactions have no receipt.
pub fn receipts_root(spec: SpecId, outcomes: &[TxOutcome]) -> Option<B256> {
    if !spec.is_enabled_in(SpecId::BYZANTIUM) {
        return None;
    }
    let receipts: Vec<ReceiptEnvelope> = outcomes
        .iter()
        .filter(|o| !o.status.is_invalid())
        .map(|o| {
            let receipt = Receipt {
                status: Eip658Value::Eip658(o.status.is_success()),
                cumulative_gas_used: o.cumulative_gas_used,
                logs: o.logs.clone(),
            };
            let with_bloom = ReceiptWithBloom {
                logs_bloom: receipt.bloom_slow(),
                receipt,
            };
            match o.tx_type {
                1 => ReceiptEnvelope::Eip2930(with_bloom),
                2 => ReceiptEnvelope::Eip1559(with_bloom),
                3 => ReceiptEnvelope::Eip4844(with_bloom),
                4 => ReceiptEnvelope::Eip7702(with_bloom),
                _ => ReceiptEnvelope::Legacy(with_bloom),
            }
        })
        .collect();
    Some(alloy_trie::root::ordered_trie_root_with_encoder(
        &receipts,
        |r, buf| r.encode_2718(buf),
    ))
}
