// Renders formulas with KaTeX for the derivation book, at build time, so that the pages
// need no script in the browser.  Standard input: a JSON list of [latex, display] pairs;
// standard output: a JSON list of {html, error} in the same order.  A formula KaTeX
// rejects is rendered once more with throwOnError off (a red, marked span) and its error
// message returned, so that the build can name it.
const katex = require(process.argv[2]);
let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const results = JSON.parse(input).map(([latex, display]) => {
    const options = { displayMode: display, strict: "ignore", output: "htmlAndMathml" };
    try {
      return { html: katex.renderToString(latex, { ...options, throwOnError: true }), error: "" };
    } catch (error) {
      const html = katex.renderToString(latex, { ...options, throwOnError: false });
      return { html, error: String(error.message || error) };
    }
  });
  process.stdout.write(JSON.stringify(results));
});
