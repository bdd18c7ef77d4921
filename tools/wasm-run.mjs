// Runs a wasm32-wasip1 command module (a test or bench binary built by cargo) under Node's V8
// and WASI, the same JIT family Envoy uses for the filter:
//
//     node tools/wasm-run.mjs target/wasm32-wasip1/release/deps/pipeline-*.wasm [args...]
//
// scripts/bench-micro passes it to cargo as the wasm32-wasip1 runner, so
// `cargo test/bench --target wasm32-wasip1` run their binaries here. The host filesystem is
// preopened at / and the working directory is kept, so tests that read fixtures work.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
import process from 'node:process';

const [, , wasmPath, ...args] = process.argv;
if (!wasmPath) {
  console.error('usage: node tools/wasm-run.mjs MODULE.wasm [args...]');
  process.exit(2);
}
const wasi = new WASI({
  version: 'preview1',
  args: [wasmPath, ...args],
  env: { ...process.env, PWD: process.cwd() },
  preopens: { '/': '/' },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);
