// Regenerates crates/workloads/contracts/* for parex.
//
//   cd contracts && npm ci && node build.mjs
//
// ParexToken is compiled here with solc-js. The Uniswap V2 contracts and WETH9
// are NOT recompiled: their creation bytecode is taken verbatim from the build
// artifacts shipped inside the pinned npm packages, so that the UniswapV2Pair
// init code hash matches the one hard-coded in UniswapV2Router02.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");
const { keccak256 } = require("js-sha3");

const here = path.dirname(fileURLToPath(import.meta.url));
const nodeModules = path.join(here, "node_modules");
const outDir = path.resolve(here, "..", "crates", "workloads", "contracts");

// Init code hash of UniswapV2Pair hard-coded in UniswapV2Library.pairFor.
const EXPECTED_PAIR_INIT_HASH = "96e8ac4277198ff8b6f785478aa9a39f403cb768dd02cbee326c3e7da348845f";

const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "paris",
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.methodIdentifiers"] } },
};

function fail(msg) {
  console.error(`build.mjs: ERROR: ${msg}`);
  process.exit(1);
}

function pkgVersion(name) {
  return JSON.parse(fs.readFileSync(path.join(nodeModules, name, "package.json"), "utf8")).version;
}

function normHex(hex, what) {
  let h = String(hex).trim().toLowerCase();
  if (h.startsWith("0x")) h = h.slice(2);
  if (h.length === 0 || h.length % 2 !== 0 || !/^[0-9a-f]+$/.test(h)) {
    fail(`${what}: bytecode is not plain even-length hex (unlinked library placeholder?)`);
  }
  return h;
}

function keccakHex(hex) {
  return keccak256(Buffer.from(hex, "hex"));
}

function selector(sig) {
  return keccak256(sig).slice(0, 8);
}

function abiSignature(item) {
  const t = (p) => (p.type.startsWith("tuple") ? `(${p.components.map(t).join(",")})${p.type.slice(5)}` : p.type);
  return `${item.name}(${item.inputs.map(t).join(",")})`;
}

// ---- 1. compile ParexToken -------------------------------------------------
function findImport(importPath) {
  const candidates = [path.join(here, "src", importPath), path.join(nodeModules, importPath)];
  for (const c of candidates) {
    if (fs.existsSync(c)) return { contents: fs.readFileSync(c, "utf8") };
  }
  return { error: `import not found: ${importPath}` };
}

const input = {
  language: "Solidity",
  sources: { "ParexToken.sol": { content: fs.readFileSync(path.join(here, "src", "ParexToken.sol"), "utf8") } },
  settings: SETTINGS,
};
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));
for (const e of output.errors ?? []) {
  if (e.severity === "error") fail(`solc: ${e.formattedMessage}`);
  console.warn(e.formattedMessage);
}
const token = output.contracts["ParexToken.sol"].ParexToken;
const tokenBin = normHex(token.evm.bytecode.object, "ParexToken");

// ---- 2. take shipped Uniswap / WETH artifacts --------------------------------
function artifact(pkg, file) {
  const p = path.join(nodeModules, pkg, "build", file);
  if (!fs.existsSync(p)) fail(`missing shipped artifact ${pkg}/build/${file}`);
  const j = JSON.parse(fs.readFileSync(p, "utf8"));
  const bin = j.evm?.bytecode?.object ?? j.bytecode;
  if (j.bytecode && j.evm?.bytecode?.object && normHex(j.bytecode, file) !== normHex(j.evm.bytecode.object, file)) {
    fail(`${pkg}/build/${file}: 'bytecode' and 'evm.bytecode.object' disagree`);
  }
  return { abi: j.abi, bin: normHex(bin, file), source: `${pkg}@${pkgVersion(pkg)} build/${file}` };
}

const factory = artifact("@uniswap/v2-core", "UniswapV2Factory.json");
const pair = artifact("@uniswap/v2-core", "UniswapV2Pair.json");
const router = artifact("@uniswap/v2-periphery", "UniswapV2Router02.json");
const weth = artifact("@uniswap/v2-periphery", "WETH9.json");

// ---- 3. init code hash check ---------------------------------------------------
const pairHash = keccakHex(pair.bin);
console.log(`keccak256(UniswapV2Pair init code) = 0x${pairHash}`);
console.log(`expected (UniswapV2Library.pairFor)  = 0x${EXPECTED_PAIR_INIT_HASH}`);
const routerEmbedsExpected = router.bin.includes(EXPECTED_PAIR_INIT_HASH);
const routerEmbedsActual = router.bin.includes(pairHash);
console.log(`router bytecode contains expected hash: ${routerEmbedsExpected}`);
console.log(`router bytecode contains computed pair hash: ${routerEmbedsActual}`);
if (pairHash !== EXPECTED_PAIR_INIT_HASH || !routerEmbedsExpected) {
  // Report what the router does embed: in pairFor the hash is a PUSH32 (0x7f)
  // right before keccak256 of abi.encodePacked(hex'ff', factory, salt, hash).
  const pushes = [...router.bin.matchAll(/7f([0-9a-f]{64})/g)].map((m) => m[1]);
  fail(
    `UniswapV2Pair init code hash MISMATCH: pair artifact hashes to 0x${pairHash}, ` +
      `router embeds expected hash: ${routerEmbedsExpected}. PUSH32 constants in router: ${pushes.join(", ")}`,
  );
}
console.log("OK: UniswapV2Pair init code hash matches the hash hard-coded in UniswapV2Router02");
// The factory deploys pairs with CREATE2 using its embedded copy of the pair
// creation code; it must be byte-identical so pair addresses agree with pairFor.
if (!factory.bin.includes(pair.bin)) fail("UniswapV2Factory does not embed the UniswapV2Pair init code verbatim");
console.log("OK: UniswapV2Factory embeds the same UniswapV2Pair init code");

// ---- 4. selectors -----------------------------------------------------------
const wanted = [
  ["ParexToken", token.abi, ["transfer(address,uint256)", "approve(address,uint256)", "balanceOf(address)", "transferFrom(address,address,uint256)"]],
  ["UniswapV2Factory", factory.abi, ["createPair(address,address)", "getPair(address,address)"]],
  ["UniswapV2Pair", pair.abi, ["getReserves()", "swap(uint256,uint256,address,bytes)", "mint(address)", "token0()"]],
  ["UniswapV2Router02", router.abi, [
    "addLiquidity(address,address,uint256,uint256,uint256,uint256,address,uint256)",
    "swapExactTokensForTokens(uint256,uint256,address[],address,uint256)",
  ]],
];
const selectorLines = [];
for (const [name, abi, sigs] of wanted) {
  const have = new Set(abi.filter((i) => i.type === "function").map(abiSignature));
  for (const sig of sigs) {
    if (!have.has(sig)) fail(`${name} ABI has no function ${sig}`);
    const sel = selector(sig);
    if (name === "ParexToken" && token.evm.methodIdentifiers[sig] !== sel) {
      fail(`selector cross-check failed for ${sig}: solc ${token.evm.methodIdentifiers[sig]} vs keccak ${sel}`);
    }
    selectorLines.push(`${sig} ${sel}`);
  }
}

// ---- 5. write outputs ---------------------------------------------------------
fs.mkdirSync(outDir, { recursive: true });
const bins = {
  "ParexToken.bin": tokenBin,
  "UniswapV2Factory.bin": factory.bin,
  "UniswapV2Pair.bin": pair.bin,
  "UniswapV2Router02.bin": router.bin,
  "WETH9.bin": weth.bin,
};
for (const [file, hex] of Object.entries(bins)) {
  fs.writeFileSync(path.join(outDir, file), hex + "\n");
  console.log(`wrote ${file}: ${hex.length / 2} bytes`);
}
fs.writeFileSync(path.join(outDir, "selectors.txt"), selectorLines.join("\n") + "\n");
console.log("wrote selectors.txt");

const ctorArgs = (abi) => {
  const c = abi.find((i) => i.type === "constructor");
  return c && c.inputs.length ? c.inputs.map((i) => `${i.type} ${i.name}`).join(", ") : "none";
};
const solcVersion = solc.version();
const readme = `# Workload contract artifacts

Generated by \`contracts/build.mjs\`; do not edit by hand. Regenerate with:

    cd contracts && npm ci && node build.mjs

Each \`*.bin\` is creation (init) bytecode: one line of lowercase hex, no \`0x\`,
trailing newline. To deploy, append ABI-encoded constructor arguments.

| File | Contents | Source | Constructor args |
|------|----------|--------|------------------|
| ParexToken.bin | ERC20 (OpenZeppelin), mints \`initialSupply\` to deployer | \`contracts/src/ParexToken.sol\`, @openzeppelin/contracts@${pkgVersion("@openzeppelin/contracts")} | ${ctorArgs(token.abi)} |
| UniswapV2Factory.bin | Uniswap V2 factory | ${factory.source} | ${ctorArgs(factory.abi)} |
| UniswapV2Pair.bin | Uniswap V2 pair | ${pair.source} | ${ctorArgs(pair.abi)} |
| UniswapV2Router02.bin | Uniswap V2 router | ${router.source} | ${ctorArgs(router.abi)} |
| WETH9.bin | Wrapped ether | ${weth.source} | ${ctorArgs(weth.abi)} |

- ParexToken is compiled with solc-js ${solcVersion}, optimizer enabled (runs=200),
  evmVersion \`paris\` (no PUSH0).
- The Uniswap and WETH9 bytecode is copied unchanged from the build artifacts shipped
  in the npm packages (not recompiled). keccak256 of UniswapV2Pair.bin is
  \`0x${pairHash}\`, equal to the init code hash hard-coded in
  UniswapV2Router02 (\`UniswapV2Library.pairFor\`); the build checks this.
- \`selectors.txt\`: \`signature selector\` per line (4-byte selector, hex, no \`0x\`)
  for the functions the workloads call.
`;
fs.writeFileSync(path.join(outDir, "README.md"), readme);
console.log("wrote README.md");
