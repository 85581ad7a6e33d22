// Driven by scripts/browser-demo.sh: logs in to the HTTPS demo in headless
// Chromium and checks what the app received. Exits non-zero on any miss.
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [spki, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    `--ignore-certificate-errors-spki-list=${spki}`,
  ],
});
const fail = (msg) => { console.error(`browser-demo: ${msg}`); process.exitCode = 1; };
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 900 } });
  await page.goto("https://localhost:8443/", { timeout: 15000 });
  if (!page.url().endsWith("/public/login")) fail(`expected the login form, got ${page.url()}`);
  await page.fill("input[name=user]", "alice");
  const [resp] = await Promise.all([
    page.waitForNavigation({ timeout: 15000 }),
    page.click("button"),
  ]);
  const title = await page.textContent("h1");
  if (title !== "Hello, alice") fail(`expected "Hello, alice", got "${title}"`);
  const headers = Object.fromEntries(await page.$$eval("table tr", (rows) =>
    rows.map((r) => [...r.querySelectorAll("td")].map((td) => td.textContent))));
  if (headers["x-forwarded-proto"] !== "https") fail(`x-forwarded-proto: ${headers["x-forwarded-proto"]}`);
  if (headers["x-forwarded-for"] !== "127.0.0.1") fail(`x-forwarded-for: ${headers["x-forwarded-for"]}`);
  if (headers["x-user-id"] !== "alice") fail(`x-user-id: ${headers["x-user-id"]}`);
  const protocol = await page.evaluate(() => performance.getEntriesByType("navigation")[0].nextHopProtocol);
  if (protocol !== "h2") fail(`expected HTTP/2, got ${protocol}`);
  const security = await resp.securityDetails();
  const tls = security ? security.protocol : "none";
  if (tls !== "TLS 1.3") fail(`expected TLS 1.3, got ${tls}`);
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === "sg_session");
  if (!session || !session.secure || !session.httpOnly) fail(`session cookie not Secure + HttpOnly: ${JSON.stringify(session)}`);
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`browser-demo: logged in as alice over ${tls}, ${protocol}; x-forwarded-proto ${headers["x-forwarded-proto"]}, x-forwarded-for ${headers["x-forwarded-for"]}; screenshot ${shot}`);
} finally {
  await browser.close();
}
