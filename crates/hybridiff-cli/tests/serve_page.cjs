// The web page of `hybridiff serve` in headless Chromium (run by tests/serve.rs): type a
// prompt, click Generate, wait for the image, check its size, keep a screenshot.
//
// Usage: node serve_page.cjs BASE_URL PLAYWRIGHT_CORE_DIR CHROMIUM SCREENSHOT PROFILE_DIR
// Prints one JSON line with what it saw.
"use strict";
const [base, pwDir, chromiumPath, shot, profile] = process.argv.slice(2);
const { chromium } = require(pwDir);

(async () => {
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run",
    ],
    viewport: { width: 1000, height: 640 },
  });
  let exitCode = 0;
  try {
    const page = context.pages()[0] || (await context.newPage());
    const external = [];
    page.on("request", (r) => { if (!r.url().startsWith(base)) external.push(r.url()); });
    await page.goto(base + "/", { waitUntil: "load" });
    await page.waitForFunction(() => document.getElementById("steps").value !== "");
    await page.fill("#prompt", "a purple circle on a white background");
    await page.fill("#seed", "5");
    await page.fill("#steps", "40");
    // Record every status line the page shows while it runs (per-step progress).
    await page.evaluate(() => {
      window.__seen = [];
      new MutationObserver(() => window.__seen.push(document.getElementById("status").textContent))
        .observe(document.getElementById("status"), { childList: true, characterData: true, subtree: true });
    });
    await page.click("#generate");
    await page.waitForFunction(() => {
      const i = document.getElementById("result");
      return !i.hidden && i.complete && i.naturalWidth > 0;
    }, null, { timeout: 120000 });
    const natural = await page.$eval("#result", (i) => [i.naturalWidth, i.naturalHeight]);
    const status = await page.textContent("#status");
    const seen = await page.evaluate(() => window.__seen);
    const steps = seen.filter((t) => /^step \d+\/40/.test(t));
    await page.screenshot({ path: shot });
    console.log(JSON.stringify({ natural, status, progress_seen: steps.length, last_step: steps[steps.length - 1] || null, external }));
    if (external.length) { console.error("requests outside the service: " + external); exitCode = 1; }
  } catch (e) {
    console.error(e && e.stack || String(e));
    exitCode = 1;
  } finally {
    await context.close();
  }
  process.exit(exitCode);
})();
