//! Real Ethereum mainnet blocks with their pre-state.
//!
//! Two layouts are read:
//! * **plain** (`../shared/data/mainnet`): `blocks/<n>/block.json` (an
//!   `eth_getBlockByNumber(n, true)` result), `blocks/<n>/pre_state.json` (geth
//!   prestateTracer style) and `block_hashes.json`. A single block directory, or any
//!   directory whose subdirectories are block directories, works too.
//! * **compact** (the repository's `data/mainnet`, see [`pack`]): per block
//!   `<n>.block.json.zst` and `<n>.pre_state.json.zst` whose accounts name their code by
//!   hash, one deduplicated `codes.json.zst`, and `block_hashes.json.zst`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use alloy_consensus::TxEnvelope;
use alloy_consensus::transaction::SignerRecoverable;
use alloy_primitives::{Address, B256, Bloom, Bytes, U256, keccak256};
use alloy_rpc_types_eth::{Block, BlockTransactions, Transaction};
use parex_core::{AccountInfo, AccountValue, InMemoryStorage, StateKey, StateValue};
use parex_evm::block::tx_env_from_envelope;
use parex_evm::{EvmBlock, EvmTx, MAINNET_CHAIN_ID, spec_for_block};
use rayon::prelude::*;
use revm::bytecode::Bytecode;
use revm::context::BlockEnv;
use revm::primitives::eip4844::{
    BLOB_BASE_FEE_UPDATE_FRACTION_CANCUN, BLOB_BASE_FEE_UPDATE_FRACTION_PRAGUE,
};
use revm::primitives::hardfork::SpecId;
use serde::{Deserialize, Serialize};

/// What went wrong loading mainnet data; every variant names the file or block.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // The cause is part of the message (named `cause`, not `source`, so that it is not
    // printed twice when the error chain is shown).
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: malformed JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error(
        "{0}: not a mainnet data directory (expected blocks/<n>/block.json, <n>/block.json, block.json, or a compact copy with codes.json.zst)"
    )]
    NotADataDir(PathBuf),
    #[error("block {block}: {message}")]
    Block { block: u64, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |cause| DataError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// What the header says the block's execution must produce.
#[derive(Clone, Debug)]
pub struct HeaderChecks {
    pub gas_used: u64,
    pub logs_bloom: Bloom,
    pub receipts_root: B256,
}

/// A mainnet block, ready to execute.
pub struct MainnetBlock {
    pub number: u64,
    pub block: EvmBlock,
    pub pre_state: InMemoryStorage<StateKey, StateValue>,
    pub expected: HeaderChecks,
    /// The signed transactions with the sender the JSON names, for sender recovery.
    pub signed: Vec<(TxEnvelope, Address)>,
}

impl MainnetBlock {
    pub fn spec(&self) -> SpecId {
        self.block.spec
    }

    /// Recovers every sender from its signature (in parallel) and checks it against the
    /// `from` of the JSON.
    pub fn recover_senders(&self) -> Result<(), DataError> {
        self.signed.par_iter().enumerate().try_for_each(|(i, (tx, from))| {
            let recovered = tx.recover_signer().map_err(|e| DataError::Block {
                block: self.number,
                message: format!("transaction {i}: cannot recover sender: {e}"),
            })?;
            if recovered != *from {
                return Err(DataError::Block {
                    block: self.number,
                    message: format!(
                        "transaction {i}: recovered sender {recovered} differs from `from` {from}"
                    ),
                });
            }
            Ok(())
        })
    }
}

/// Where a set of blocks lives.
#[derive(Clone, Debug)]
pub enum Source {
    /// The plain layout; each entry is one block directory.
    Plain {
        block_dirs: Vec<(u64, PathBuf)>,
        block_hashes: Option<PathBuf>,
    },
    /// The compact copy.
    Compact { dir: PathBuf, numbers: Vec<u64> },
}

impl Source {
    /// Finds the blocks under `dir`, in either layout.
    pub fn open(dir: &Path) -> Result<Source, DataError> {
        if !dir.is_dir() {
            return Err(DataError::Io {
                path: dir.to_path_buf(),
                cause: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            });
        }
        if dir.join("codes.json.zst").is_file() {
            let mut numbers = Vec::new();
            for entry in fs::read_dir(dir).map_err(io_err(dir))? {
                let name = entry.map_err(io_err(dir))?.file_name();
                let name = name.to_string_lossy();
                if let Some(n) = name.strip_suffix(".block.json.zst")
                    && let Ok(n) = n.parse()
                {
                    numbers.push(n);
                }
            }
            numbers.sort_unstable();
            return Ok(Source::Compact {
                dir: dir.to_path_buf(),
                numbers,
            });
        }
        let block_dirs = if dir.join("block.json").is_file() {
            vec![(block_number_of_dir(dir), dir.to_path_buf())]
        } else {
            let parent = if dir.join("blocks").is_dir() {
                dir.join("blocks")
            } else {
                dir.to_path_buf()
            };
            let mut dirs = Vec::new();
            for entry in fs::read_dir(&parent).map_err(io_err(&parent))? {
                let path = entry.map_err(io_err(&parent))?.path();
                if path.join("block.json").is_file() {
                    dirs.push((block_number_of_dir(&path), path));
                }
            }
            dirs
        };
        if block_dirs.is_empty() {
            return Err(DataError::NotADataDir(dir.to_path_buf()));
        }
        let mut block_dirs = block_dirs;
        block_dirs.sort();
        // block_hashes.json sits at the data set's root: look in the directory and up.
        let block_hashes = dir
            .ancestors()
            .take(4)
            .map(|d| d.join("block_hashes.json"))
            .find(|p| p.is_file());
        Ok(Source::Plain {
            block_dirs,
            block_hashes,
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Source::Plain { block_dirs, .. } => block_dirs.len(),
            Source::Compact { numbers, .. } => numbers.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads every block (in number order), sharing the hash and code tables.
    pub fn load_all(&self) -> Vec<(u64, Result<MainnetBlock, DataError>)> {
        self.load_where(|_| true)
    }

    /// Loads the blocks whose number `wanted` accepts (in number order).
    pub fn load_where(
        &self,
        wanted: impl Fn(u64) -> bool,
    ) -> Vec<(u64, Result<MainnetBlock, DataError>)> {
        let shared = match self.shared_tables() {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                return self
                    .numbers()
                    .into_iter()
                    .filter(|&n| wanted(n))
                    .map(|n| {
                        (
                            n,
                            Err(DataError::Block {
                                block: n,
                                message: msg.clone(),
                            }),
                        )
                    })
                    .collect();
            }
        };
        self.numbers()
            .into_iter()
            .enumerate()
            .filter(|&(_, n)| wanted(n))
            .map(|(i, n)| (n, self.load_one(i, &shared)))
            .collect()
    }

    /// Block numbers, in order (a plain block directory not named by its number is 0).
    pub fn numbers(&self) -> Vec<u64> {
        match self {
            Source::Plain { block_dirs, .. } => block_dirs.iter().map(|(n, _)| *n).collect(),
            Source::Compact { numbers, .. } => numbers.clone(),
        }
    }

    fn shared_tables(&self) -> Result<SharedTables, DataError> {
        match self {
            Source::Plain { block_hashes, .. } => {
                let hashes = match block_hashes {
                    Some(p) => parse_block_hashes(&read(p)?, p)?,
                    None => HashMap::new(),
                };
                Ok(SharedTables {
                    hashes: Arc::new(hashes),
                    codes: HashMap::new(),
                })
            }
            Source::Compact { dir, .. } => {
                let p = dir.join("block_hashes.json.zst");
                let hashes = parse_block_hashes(&read_zst(&p)?, &p)?;
                let p = dir.join("codes.json.zst");
                let raw: HashMap<B256, Bytes> = parse_json(&read_zst(&p)?, &p)?;
                let codes = raw
                    .into_iter()
                    .map(|(h, c)| (h, Bytecode::new_raw(c)))
                    .collect();
                Ok(SharedTables {
                    hashes: Arc::new(hashes),
                    codes,
                })
            }
        }
    }

    fn load_one(&self, i: usize, shared: &SharedTables) -> Result<MainnetBlock, DataError> {
        let (block_json, pre_json, block_path, pre_path) = match self {
            Source::Plain { block_dirs, .. } => {
                let dir = &block_dirs[i].1;
                let (bp, pp) = (dir.join("block.json"), dir.join("pre_state.json"));
                (read(&bp)?, read(&pp)?, bp, pp)
            }
            Source::Compact { dir, numbers } => {
                let n = numbers[i];
                let bp = dir.join(format!("{n}.block.json.zst"));
                let pp = dir.join(format!("{n}.pre_state.json.zst"));
                (read_zst(&bp)?, read_zst(&pp)?, bp, pp)
            }
        };
        let block: Block<Transaction> = parse_json(&block_json, &block_path)?;
        let pre: BTreeMap<Address, PreAccount> = parse_json(&pre_json, &pre_path)?;
        build_block(block, pre, shared)
    }
}

struct SharedTables {
    hashes: Arc<HashMap<u64, B256>>,
    codes: HashMap<B256, Bytecode>,
}

fn block_number_of_dir(dir: &Path) -> u64 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    fs::read(path).map_err(io_err(path))
}

fn read_zst(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read(path)?;
    zstd::decode_all(&bytes[..]).map_err(io_err(path))
}

fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], path: &Path) -> Result<T, DataError> {
    serde_json::from_slice(bytes).map_err(|cause| DataError::Json {
        path: path.to_path_buf(),
        cause,
    })
}

fn parse_block_hashes(bytes: &[u8], path: &Path) -> Result<HashMap<u64, B256>, DataError> {
    let raw: HashMap<String, B256> = parse_json(bytes, path)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<u64>()
                .map(|k| (k, v))
                .map_err(|_| DataError::Json {
                    path: path.to_path_buf(),
                    cause: serde::de::Error::custom(format!(
                        "block number {k:?} is not a decimal number"
                    )),
                })
        })
        .collect()
}

/// One account of a pre-state file: plain files carry `code`, compact ones `code_hash`.
#[derive(Debug, Deserialize, Serialize)]
struct PreAccount {
    balance: U256,
    #[serde(default)]
    nonce: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code_hash: Option<B256>,
    #[serde(default)]
    storage: BTreeMap<U256, U256>,
}

fn build_block(
    block: Block<Transaction>,
    pre: BTreeMap<Address, PreAccount>,
    shared: &SharedTables,
) -> Result<MainnetBlock, DataError> {
    let header = &block.header.inner;
    let number = header.number;
    let bad = |message: String| DataError::Block {
        block: number,
        message,
    };
    let spec = spec_for_block(number, header.timestamp);

    let mut env = BlockEnv {
        number: U256::from(number),
        beneficiary: header.beneficiary,
        timestamp: U256::from(header.timestamp),
        gas_limit: header.gas_limit,
        basefee: header.base_fee_per_gas.unwrap_or_default(),
        difficulty: header.difficulty,
        prevrandao: spec.is_enabled_in(SpecId::MERGE).then_some(header.mix_hash),
        ..BlockEnv::default()
    };
    if spec.is_enabled_in(SpecId::CANCUN) {
        let excess = header
            .excess_blob_gas
            .ok_or_else(|| bad("Cancun block without excessBlobGas".into()))?;
        let fraction = if spec.is_enabled_in(SpecId::PRAGUE) {
            BLOB_BASE_FEE_UPDATE_FRACTION_PRAGUE
        } else {
            BLOB_BASE_FEE_UPDATE_FRACTION_CANCUN
        };
        env.set_blob_excess_gas_and_price(excess, fraction);
    }

    let txs = match block.transactions {
        BlockTransactions::Full(txs) => txs,
        BlockTransactions::Hashes(h) if h.is_empty() => Vec::new(),
        _ => {
            return Err(bad(
                "block.json must hold full transactions (eth_getBlockByNumber(n, true))".into(),
            ));
        }
    };
    let mut evm_txs = Vec::with_capacity(txs.len());
    let mut signed = Vec::with_capacity(txs.len());
    for tx in txs {
        let from = tx.inner.signer();
        let envelope = tx.inner.into_inner();
        evm_txs.push(EvmTx {
            env: Arc::new(tx_env_from_envelope(&envelope, from)),
            hash: Some(*envelope.tx_hash()),
        });
        signed.push((envelope, from));
    }

    let mut pre_state = InMemoryStorage::new();
    for (address, account) in pre {
        let code_hash = match (&account.code, account.code_hash) {
            (Some(code), _) if !code.is_empty() => {
                let hash = keccak256(code);
                pre_state.insert(
                    StateKey::Code(hash),
                    StateValue::Code(Bytecode::new_raw(code.clone())),
                );
                hash
            }
            (_, Some(hash)) if hash != revm::primitives::KECCAK_EMPTY => {
                let code = shared.codes.get(&hash).ok_or_else(|| {
                    bad(format!(
                        "account {address}: code {hash} missing from codes.json.zst"
                    ))
                })?;
                pre_state.insert(StateKey::Code(hash), StateValue::Code(code.clone()));
                hash
            }
            _ => revm::primitives::KECCAK_EMPTY,
        };
        let info = AccountInfo {
            balance: account.balance,
            nonce: account.nonce,
            code_hash,
        };
        pre_state.insert(
            StateKey::Account(address),
            StateValue::Account(AccountValue {
                info: Some(info),
                ..AccountValue::default()
            }),
        );
        for (slot, value) in account.storage {
            pre_state.insert(StateKey::Slot(address, 0, slot), StateValue::Slot(value));
        }
    }
    parex_evm::split_contract_balances(&mut pre_state, env.beneficiary);

    Ok(MainnetBlock {
        number,
        block: EvmBlock {
            number,
            spec,
            chain_id: MAINNET_CHAIN_ID,
            env,
            txs: evm_txs,
            block_hashes: shared.hashes.clone(),
        },
        pre_state,
        expected: HeaderChecks {
            gas_used: header.gas_used,
            logs_bloom: header.logs_bloom,
            receipts_root: header.receipts_root,
        },
        signed,
    })
}

/// Writes the compact copy of the plain data set at `src` into `out` (see the module
/// documentation), returning the number of blocks and the bytes written. The copy is built
/// beside `out` and moved into place only when complete: a failure leaves `out` untouched.
pub fn pack(src: &Path, out: &Path) -> Result<(usize, u64), DataError> {
    let Source::Plain {
        block_dirs,
        block_hashes,
    } = Source::open(src)?
    else {
        return Err(DataError::NotADataDir(src.to_path_buf()));
    };
    let name = out
        .file_name()
        .map_or("mainnet".into(), |n| n.to_string_lossy().into_owned());
    let staging = out.with_file_name(format!(".{name}.packing-{}", std::process::id()));
    let result = pack_into(&block_dirs, block_hashes.as_deref(), &staging).and_then(|packed| {
        if out.exists() {
            fs::remove_dir_all(out).map_err(io_err(out))?;
        }
        fs::rename(&staging, out).map_err(io_err(out))?;
        Ok(packed)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn pack_into(
    block_dirs: &[(u64, PathBuf)],
    block_hashes: Option<&Path>,
    out: &Path,
) -> Result<(usize, u64), DataError> {
    fs::create_dir_all(out).map_err(io_err(out))?;
    let mut written = 0u64;
    let mut write_zst = |name: String, bytes: &[u8]| -> Result<(), DataError> {
        let path = out.join(name);
        let packed = zstd::encode_all(bytes, 19).map_err(io_err(&path))?;
        written += packed.len() as u64;
        fs::write(&path, packed).map_err(io_err(&path))
    };
    let mut codes: BTreeMap<B256, Bytes> = BTreeMap::new();
    for (n, dir) in block_dirs {
        let bp = dir.join("block.json");
        let pp = dir.join("pre_state.json");
        let mut pre: BTreeMap<Address, PreAccount> = parse_json(&read(&pp)?, &pp)?;
        for account in pre.values_mut() {
            if let Some(code) = account.code.take()
                && !code.is_empty()
            {
                let hash = keccak256(&code);
                codes.insert(hash, code);
                account.code_hash = Some(hash);
            }
        }
        // Stored verbatim, but only once it parses as a block.
        let block_json = read(&bp)?;
        parse_json::<Block<Transaction>>(&block_json, &bp)?;
        write_zst(format!("{n}.block.json.zst"), &block_json)?;
        let pre_bytes = serde_json::to_vec(&pre).expect("serializing a pre-state cannot fail");
        write_zst(format!("{n}.pre_state.json.zst"), &pre_bytes)?;
    }
    let hashes = match block_hashes {
        Some(p) => read(p)?,
        None => b"{}".to_vec(),
    };
    write_zst("block_hashes.json.zst".into(), &hashes)?;
    write_zst(
        "codes.json.zst".into(),
        &serde_json::to_vec(&codes).expect("serializable"),
    )?;
    Ok((block_dirs.len(), written))
}

/// The repository's built-in compact copy of the mainnet blocks.
pub fn builtin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PAREX_MAINNET_DATA") {
        return PathBuf::from(dir);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mainnet");
    dir.canonicalize().unwrap_or(dir)
}
