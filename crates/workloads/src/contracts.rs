//! The real contracts the synthetic workloads deploy (creation code compiled from the
//! npm packages by `contracts/build.mjs`), and their ABI.

use alloy_primitives::{Address, B256, Bytes, hex, keccak256};
use alloy_sol_types::{SolConstructor, sol};

sol! {
    /// OpenZeppelin ERC20 (contracts/src/ParexToken.sol).
    contract ParexToken {
        constructor(string name_, string symbol_, uint256 initialSupply);
        function transfer(address to, uint256 value) external returns (bool);
        function approve(address spender, uint256 value) external returns (bool);
        function balanceOf(address account) external view returns (uint256);
    }
    contract UniswapV2Factory {
        constructor(address feeToSetter);
    }
    contract UniswapV2Router02 {
        constructor(address factory, address weth);
        function addLiquidity(address tokenA, address tokenB, uint256 amountADesired, uint256 amountBDesired,
            uint256 amountAMin, uint256 amountBMin, address to, uint256 deadline)
            external returns (uint256 amountA, uint256 amountB, uint256 liquidity);
        function swapExactTokensForTokens(uint256 amountIn, uint256 amountOutMin, address[] path,
            address to, uint256 deadline) external returns (uint256[] amounts);
    }
}

fn artifact(hex_text: &str) -> Vec<u8> {
    hex::decode(hex_text.trim()).expect("committed artifacts are valid hex")
}

/// Creation code of a contract with its ABI-encoded constructor arguments appended.
fn with_args(code: &str, args: Vec<u8>) -> Bytes {
    let mut init = artifact(code);
    init.extend_from_slice(&args);
    init.into()
}

pub fn token_init(name: &str, symbol: &str, supply: alloy_primitives::U256) -> Bytes {
    let args = ParexToken::constructorCall {
        name_: name.to_string(),
        symbol_: symbol.to_string(),
        initialSupply: supply,
    }
    .abi_encode();
    with_args(include_str!("../contracts/ParexToken.bin"), args)
}

pub fn factory_init(fee_to_setter: Address) -> Bytes {
    let args = UniswapV2Factory::constructorCall {
        feeToSetter: fee_to_setter,
    }
    .abi_encode();
    with_args(include_str!("../contracts/UniswapV2Factory.bin"), args)
}

pub fn router_init(factory: Address, weth: Address) -> Bytes {
    let args = UniswapV2Router02::constructorCall { factory, weth }.abi_encode();
    with_args(include_str!("../contracts/UniswapV2Router02.bin"), args)
}

pub fn weth_init() -> Bytes {
    artifact(include_str!("../contracts/WETH9.bin")).into()
}

/// keccak256 of the pair's creation code: the CREATE2 init code hash of every pair.
pub fn pair_init_code_hash() -> B256 {
    keccak256(artifact(include_str!("../contracts/UniswapV2Pair.bin")))
}

/// The address at which `factory` creates the pair of `a` and `b` (CREATE2).
pub fn pair_address(factory: Address, a: Address, b: Address) -> Address {
    let (t0, t1) = if a < b { (a, b) } else { (b, a) };
    let mut salt_input = [0u8; 40];
    salt_input[..20].copy_from_slice(t0.as_slice());
    salt_input[20..].copy_from_slice(t1.as_slice());
    factory.create2(keccak256(salt_input), pair_init_code_hash())
}

/// Storage layout facts used to check setups: OpenZeppelin 5 ERC20 keeps `_balances` in
/// slot 0; a Uniswap V2 pair packs reserve0 (112 bits), reserve1 (112) and the last
/// block timestamp (32) into slot 8.
pub mod layout {
    use alloy_primitives::{Address, U256, keccak256};

    pub const ERC20_BALANCES_SLOT: u64 = 0;
    pub const PAIR_RESERVES_SLOT: u64 = 8;

    /// The slot of `balances[holder]` in a mapping declared at `mapping_slot`.
    pub fn mapping_slot(holder: Address, mapping_slot: u64) -> U256 {
        let mut buf = [0u8; 64];
        buf[12..32].copy_from_slice(holder.as_slice());
        buf[32..].copy_from_slice(&U256::from(mapping_slot).to_be_bytes::<32>());
        U256::from_be_bytes(keccak256(buf).0)
    }

    /// (reserve0, reserve1) from the packed reserves slot.
    pub fn unpack_reserves(word: U256) -> (U256, U256) {
        let mask = (U256::from(1) << 112) - U256::from(1);
        (word & mask, (word >> 112) & mask)
    }
}
