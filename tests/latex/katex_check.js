// Renders every equation given on standard input (a JSON list of LaTeX strings) with KaTeX,
// throwOnError on, and prints a JSON list of {index, error} for the ones KaTeX rejects.
const katex = require(process.argv[2]);
let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const failures = [];
  JSON.parse(input).forEach((equation, index) => {
    try {
      katex.renderToString(equation, { throwOnError: true, displayMode: true, strict: "ignore" });
    } catch (error) {
      failures.push({ index, error: String(error.message || error) });
    }
  });
  process.stdout.write(JSON.stringify(failures));
});
