// The billing page: reads the credits API with the signed-in user's token.
// Vanilla JS, no build step. Amounts stay decimal strings end to end: no
// number ever touches money here either.

const TOKEN_KEY = "callora-credits-demo.token";
const root = document.getElementById("billing");
const urls = {
  balance: root.dataset.balanceUrl,
  transactions: root.dataset.transactionsUrl,
  topup: root.dataset.topupUrl,
  usage: root.dataset.usageUrl,
  grants: root.dataset.grantsUrl,
  paid: root.dataset.paidUrl,
};
const pageSize = Number(root.dataset.pageSize) || 20;
const $ = (id) => document.getElementById(id);

// --- readable errors ----------------------------------------------------------

const SIGN_IN_AGAIN =
  "Your sign-in link is not valid. Run make demo and open one of the links it prints.";
const MESSAGES = {
  INSUFFICIENT_CREDITS: "Not enough credits for this call.",
  UNAUTHORIZED: SIGN_IN_AGAIN,
  INVALID_AUTH_HEADER: SIGN_IN_AGAIN,
  MISSING_TOKEN: SIGN_IN_AGAIN,
  INVALID_TOKEN: SIGN_IN_AGAIN,
  MISSING_CLAIMS: SIGN_IN_AGAIN,
  TOKEN_NOT_ACTIVE: SIGN_IN_AGAIN,
  TOKEN_EXPIRED: "Your sign-in link has expired. Run make demo for a fresh one.",
  FORBIDDEN: "Your account is not allowed to do that.",
  NOT_FOUND: "That was not found.",
  PAYLOAD_TOO_LARGE: "That request is too large.",
  BALANCE_LIMIT_EXCEEDED: "That credit would take the balance over its limit.",
  DUPLICATE_REFERENCE: "That payment has already been credited.",
  IDEMPOTENCY_IN_PROGRESS: "That request is still being processed. Try again in a moment.",
  IDEMPOTENCY_CONFLICT: "That request clashes with an earlier one. Please try again.",
  INTERNAL_SERVER_ERROR: "Something went wrong on our side. Please try again.",
};
const FIELD_NAMES = {
  amount_usdc: "Amount",
  user_id: "User id",
  expires_at: "Expiry",
  cursor: "Page",
};
const NETWORK_ERROR = "Could not reach the server. Check your connection and try again.";

class ApiError extends Error {
  constructor(message, { status = 0, code = null, requestId = null, retryable = false } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
    this.retryable = retryable;
  }
}

// The API's details are sentences ("Amount must be greater than zero."); name
// the field when the sentence does not, and by its label when the sentence
// starts with its JSON name ("expires_at must be in the future").
function validationMessage(detail) {
  if (!detail || typeof detail.message !== "string") return "Please check what you entered.";
  const label = FIELD_NAMES[detail.field] || "Input";
  let sentence = detail.message.endsWith(".") ? detail.message : `${detail.message}.`;
  if (detail.field && sentence.startsWith(`${detail.field} `)) {
    sentence = label + sentence.slice(detail.field.length);
  }
  return sentence.startsWith(label) ? sentence : `${label}: ${sentence}`;
}

function readableError(status, payload) {
  const code = payload && typeof payload.code === "string" ? payload.code : null;
  let message;
  if (code === "VALIDATION_ERROR") {
    message = validationMessage(Array.isArray(payload.details) ? payload.details[0] : null);
  } else if (code && MESSAGES[code]) {
    message = MESSAGES[code];
  } else if (status === 401 || status === 422) {
    message = SIGN_IN_AGAIN; // Flask-JWT-Extended's own errors on host routes
  } else if (status === 403) {
    message = MESSAGES.FORBIDDEN;
  } else if (status >= 500) {
    message = MESSAGES.INTERNAL_SERVER_ERROR;
  } else {
    message = `The request failed (HTTP ${status}).`;
  }
  if (status >= 500 && payload && payload.requestId) {
    message += ` (Reference: ${payload.requestId})`;
  }
  return message;
}

// --- the token (demo-only sign-in) ------------------------------------------------

function takeToken() {
  const params = new URLSearchParams(window.location.search);
  const fromUrl = params.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    params.delete("token");
    const query = params.toString();
    // Out of the address bar, the history and any bookmark.
    history.replaceState(null, "", window.location.pathname + (query ? `?${query}` : ""));
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

// Only to choose what to show: the server checks the token on every call.
function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return {};
  }
}

function hasScope(claims, scope) {
  const value = claims[root.dataset.scopeClaim];
  const scopes = typeof value === "string" ? value.split(/\s+/) : Array.isArray(value) ? value : [];
  return scopes.includes(scope);
}

const token = takeToken();
const claims = token ? claimsOf(token) : {};
const me = typeof claims.sub === "string" ? claims.sub : null;
const isAdmin = hasScope(claims, root.dataset.adminScope);
let shownUser = me; // whose balance, grants, chart and history are on the page

// --- API calls ------------------------------------------------------------------

async function api(url, { method = "GET", body, headers = {} } = {}) {
  const init = { method, cache: "no-store", headers: { Authorization: `Bearer ${token}`, ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch {
    throw new ApiError(NETWORK_ERROR, { retryable: true });
  }
  if (response.ok) return response;
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // Not JSON (a proxy's error page): the status says enough.
  }
  throw new ApiError(readableError(response.status, payload), {
    status: response.status,
    code: payload && payload.code,
    requestId: payload && payload.requestId,
  });
}

function withUser(url, extra = {}) {
  const params = new URLSearchParams(extra);
  if (shownUser && shownUser !== me) params.set("user_id", shownUser);
  const query = params.toString();
  return query ? `${url}?${query}` : url;
}

// --- formatting (strings in, strings out) -----------------------------------------

// "98.7500000" -> "98.75"; keeps every significant decimal, at least two.
function usdc(value) {
  const negative = value.startsWith("-");
  const [whole, fraction = ""] = value.replace(/^[-+]/, "").split(".");
  const digits = fraction.replace(/0+$/, "").padEnd(2, "0");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${negative ? "-" : ""}${grouped}.${digits}`;
}

function signedUsdc(value) {
  return value.startsWith("-") ? `−${usdc(value).slice(1)}` : `+${usdc(value)}`;
}

const TYPE_LABELS = {
  topup: "Top-up",
  charge: "Charge",
  refund: "Refund",
  hold_capture: "Paid call",
  adjustment: "Adjustment",
  grant: "Credit grant",
  expiration: "Expired",
  void: "Voided",
};

const CATEGORY_LABELS = { paid: "Paid", promotional: "Promotional" };
const STATUS_LABELS = {
  active: "Active",
  scheduled: "Scheduled",
  depleted: "Used up",
  expired: "Expired",
  voided: "Voided",
};

function dateTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime())
    ? iso
    : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

// A <time> showing the instant in the reader's locale and time zone.
function timeElement(iso) {
  const element = document.createElement("time");
  element.dateTime = iso;
  element.title = iso;
  element.textContent = dateTime(iso);
  return element;
}

function details(entry) {
  const metadata = entry.metadata || {};
  return entry.description || entry.reference || metadata.path || metadata.reason || "";
}

// --- the page's parts --------------------------------------------------------------

function showNotice(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = !message;
}

function setText(id, message, kind = "") {
  const element = $(id);
  element.textContent = message;
  element.dataset.kind = kind;
}

async function loadBalance() {
  const figures = document.querySelector(".figures");
  figures.setAttribute("aria-busy", "true");
  try {
    const balance = await (await api(withUser(urls.balance))).json();
    $("balance").textContent = usdc(balance.balance_usdc);
    $("held").textContent = usdc(balance.held_usdc);
    $("available").textContent = usdc(balance.available_usdc);
    $("balance").dataset.value = balance.balance_usdc;
    $("paid-credit").textContent = usdc(balance.paid_usdc);
    $("promotional-credit").textContent = usdc(balance.promotional_usdc);
    showNextExpiry(balance.next_expiry);
  } finally {
    figures.setAttribute("aria-busy", "false");
  }
}

// The soonest expiry of credit that can still be spent, and how much of it
// goes then.
function showNextExpiry(nextExpiry) {
  const line = $("next-expiry");
  line.dataset.at = nextExpiry ? nextExpiry.at : "";
  line.dataset.amount = nextExpiry ? nextExpiry.amount_usdc : "";
  if (!nextExpiry) {
    line.textContent = "No credit is set to expire.";
    return;
  }
  line.replaceChildren(
    `${usdc(nextExpiry.amount_usdc)} USDC expires on `,
    timeElement(nextExpiry.at),
    ".",
  );
}

// --- the grants --------------------------------------------------------------------
// GET /credits/grants, newest first: by default the active and scheduled
// ones, with the box ticked every grant (status=all).

let grantsCursor = null;

function grantRow(grant) {
  const row = document.createElement("tr");
  row.dataset.grantId = grant.id;
  row.dataset.category = grant.category;
  row.dataset.status = grant.status;
  const cell = (content, className = "") => {
    const element = document.createElement("td");
    element.append(content);
    if (className) element.className = className;
    row.append(element);
    return element;
  };
  const category = cell(CATEGORY_LABELS[grant.category] || grant.category);
  if (grant.description || grant.reference) category.title = grant.description || grant.reference;
  cell(usdc(grant.amount_usdc), "num");
  cell(usdc(grant.remaining_usdc), "num");
  cell(usdc(grant.held_usdc), "num");
  cell(grant.expires_at ? timeElement(grant.expires_at) : "never", "when");
  const status = cell(STATUS_LABELS[grant.status] || grant.status, "status");
  status.dataset.status = grant.status;
  if (grant.status === "scheduled") {
    status.replaceChildren("Starts ", timeElement(grant.effective_at));
  }
  return row;
}

async function loadGrants({ reset = false } = {}) {
  const rows = $("grants-rows");
  const more = $("grants-more");
  const everyGrant = $("grants-all").checked;
  more.disabled = true;
  try {
    const extra = { limit: String(pageSize) };
    if (everyGrant) extra.status = "all";
    if (!reset && grantsCursor) extra.cursor = grantsCursor;
    const page = await (await api(withUser(urls.grants, extra))).json();
    if (reset) rows.replaceChildren();
    rows.append(...page.data.map(grantRow));
    grantsCursor = page.next_cursor;
    more.hidden = !grantsCursor;
    const empty = $("grants-empty");
    empty.textContent = everyGrant ? "No credit granted yet." : "No active or scheduled credit.";
    empty.hidden = rows.children.length > 0;
    setText("grants-status", reset ? "" : `Showing ${rows.children.length} grants.`);
  } finally {
    more.disabled = false;
  }
}

// --- the usage chart ---------------------------------------------------------------
// Drawn from GET /credits/usage: one pair of bars per UTC day, spent (with
// what expired on top) and added. Amounts become BigInt units, and bar
// heights are computed in integers, to hundredths of a pixel.

const SVG_NS = "http://www.w3.org/2000/svg";
const UNITS_PER_USDC = 10_000_000n;
const CHART = { width: 640, height: 220, left: 72, right: 16, top: 16, bottom: 32 };

function toUnits(value) {
  const negative = value.startsWith("-");
  const [whole, fraction = ""] = value.replace(/^[-+]/, "").split(".");
  const units = BigInt(whole) * UNITS_PER_USDC + BigInt(fraction.padEnd(7, "0").slice(0, 7));
  return negative ? -units : units;
}

function unitsToUsdc(units) {
  const whole = units / UNITS_PER_USDC;
  const fraction = (units % UNITS_PER_USDC).toString().padStart(7, "0");
  return `${whole}.${fraction}`;
}

// offset + pixels * part / whole, as "x.yy": integers only.
function scaled(offset, part, whole, pixels) {
  const hundredths = BigInt(offset * 100) + (whole ? (BigInt(pixels * 100) * part) / whole : 0n);
  return `${hundredths / 100n}.${(hundredths % 100n).toString().padStart(2, "0")}`;
}

function svgElement(name, attributes = {}, text = null) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== null) element.textContent = text;
  return element;
}

function dayLabel(iso) {
  const date = new Date(iso);
  return date.toLocaleDateString(undefined, { month: "short", day: "numeric", timeZone: "UTC" });
}

function usageChart(usage) {
  const buckets = usage.data.map((bucket) => ({
    start: bucket.start,
    debited: toUnits(bucket.debited_usdc),
    credited: toUnits(bucket.credited_usdc),
    expired: toUnits(bucket.expired_usdc),
  }));
  let highest = 0n;
  for (const bucket of buckets) {
    for (const value of [bucket.debited + bucket.expired, bucket.credited]) {
      if (value > highest) highest = value;
    }
  }
  const spent = buckets.reduce((sum, bucket) => sum + bucket.debited, 0n);
  const added = buckets.reduce((sum, bucket) => sum + bucket.credited, 0n);
  const { width, height, left, right, top, bottom } = CHART;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const base = top + plotHeight;
  const svg = svgElement("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "usage-chart",
    role: "img",
    "aria-labelledby": "chart-title chart-desc",
    "data-buckets": buckets.length,
    "data-granularity": usage.granularity,
    "data-spent": spent,
    "data-added": added,
  });
  const subject = shownUser && shownUser !== me ? ` of ${shownUser}` : "";
  svg.append(svgElement("title", { id: "chart-title" }, `Usage${subject}, by day`));
  svg.append(
    svgElement(
      "desc",
      { id: "chart-desc" },
      `Over ${buckets.length} days: ${usdc(unitsToUsdc(spent))} USDC spent, ` +
        `${usdc(unitsToUsdc(added))} USDC added.`,
    ),
  );
  const axes = svgElement("g", { class: "axes", "aria-hidden": "true" });
  axes.append(svgElement("line", { class: "axis", x1: left, y1: base, x2: width - right, y2: base }));
  axes.append(svgElement("text", { x: left - 8, y: base + 4, "text-anchor": "end" }, "0.00"));
  if (highest > 0n) {
    axes.append(svgElement("line", { class: "grid", x1: left, y1: top, x2: width - right, y2: top }));
    axes.append(
      svgElement("text", { x: left - 8, y: top + 4, "text-anchor": "end" }, usdc(unitsToUsdc(highest))),
    );
  }
  if (buckets.length) {
    const labels = [
      [left, "start", buckets[0].start],
      [width - right, "end", buckets[buckets.length - 1].start],
    ];
    for (const [x, anchor, iso] of labels) {
      axes.append(svgElement("text", { x, y: height - 8, "text-anchor": anchor }, dayLabel(iso)));
    }
  }
  svg.append(axes);
  const slot = BigInt(buckets.length || 1);
  buckets.forEach((bucket, index) => {
    const group = svgElement("g", {
      class: "bucket",
      "data-start": bucket.start,
      "data-debited": bucket.debited,
      "data-credited": bucket.credited,
      "data-expired": bucket.expired,
    });
    group.append(
      svgElement(
        "title",
        {},
        `${dayLabel(bucket.start)}: ${usdc(unitsToUsdc(bucket.debited))} spent, ` +
          `${usdc(unitsToUsdc(bucket.expired))} expired, ${usdc(unitsToUsdc(bucket.credited))} added`,
      ),
    );
    // Each day's slot holds two bars of 40% of it, side by side.
    const x = (share) => scaled(left, BigInt(index * 100 + share), slot * 100n, plotWidth);
    const barWidth = scaled(0, 40n, slot * 100n, plotWidth);
    const bar = (className, from, amount, share) => {
      if (amount <= 0n) return;
      const y = scaled(top, highest - from - amount, highest, plotHeight);
      const size = scaled(0, amount, highest, plotHeight);
      group.append(svgElement("rect", { class: className, x: x(share), y, width: barWidth, height: size }));
    };
    bar("bar-debited", 0n, bucket.debited, 10);
    bar("bar-expired", bucket.debited, bucket.expired, 10);
    bar("bar-credited", 0n, bucket.credited, 50);
    svg.append(group);
  });
  if (highest === 0n) {
    svg.append(
      svgElement(
        "text",
        { class: "empty", x: width / 2, y: height / 2, "text-anchor": "middle" },
        "No activity in these days",
      ),
    );
  }
  return svg;
}

function depletionText(estimate) {
  if (!estimate) return "No spending in the last 7 days.";
  const when = new Date(estimate.at).toLocaleDateString(undefined, { dateStyle: "medium" });
  return (
    `At the last 7 days' pace (${usdc(estimate.daily_burn_usdc)} USDC a day), ` +
    `the available credits last until ${when}.`
  );
}

async function loadChart() {
  const plot = $("chart");
  const caption = $("depletion");
  plot.setAttribute("aria-busy", "true");
  try {
    const usage = await (await api(withUser(urls.usage))).json();
    plot.replaceChildren(usageChart(usage));
    caption.textContent = depletionText(usage.depletion_estimate);
    caption.dataset.at = usage.depletion_estimate ? usage.depletion_estimate.at : "";
  } catch (error) {
    const message = document.createElement("p");
    message.className = "hint";
    message.textContent = error.message;
    plot.replaceChildren(message);
    caption.textContent = "";
  } finally {
    plot.setAttribute("aria-busy", "false");
  }
}

let nextCursor = null;

function historyRow(entry) {
  const row = document.createElement("tr");
  row.dataset.seq = entry.seq;
  const cells = [
    [String(entry.seq), "seq"],
    [dateTime(entry.created_at), "when"],
    [TYPE_LABELS[entry.type] || entry.type, ""],
    [details(entry), "details"],
    [signedUsdc(entry.amount_usdc), `num ${entry.amount_usdc.startsWith("-") ? "debit" : "credit"}`],
    [usdc(entry.balance_after_usdc), "num"],
  ];
  for (const [text, className] of cells) {
    const cell = document.createElement("td");
    cell.textContent = text;
    if (className) cell.className = className;
    row.append(cell);
  }
  row.children[1].title = entry.created_at;
  return row;
}

async function loadHistory({ reset = false } = {}) {
  const rows = $("history-rows");
  const more = $("load-more");
  more.disabled = true;
  try {
    const extra = { limit: String(pageSize) };
    if (!reset && nextCursor) extra.cursor = nextCursor;
    const page = await (await api(withUser(urls.transactions, extra))).json();
    if (reset) rows.replaceChildren();
    rows.append(...page.data.map(historyRow));
    nextCursor = page.next_cursor;
    more.hidden = !nextCursor;
    $("history-empty").hidden = rows.children.length > 0;
    setText("history-status", reset ? "" : `Showing ${rows.children.length} entries.`);
  } finally {
    more.disabled = false;
  }
}

async function refresh() {
  $("account-name").textContent = shownUser && shownUser !== me ? `· ${shownUser}` : "";
  const results = await Promise.allSettled([
    loadBalance(),
    loadGrants({ reset: true }),
    loadChart(),
    loadHistory({ reset: true }),
  ]);
  const failed = results.find((result) => result.status === "rejected");
  showNotice(failed ? failed.reason.message : "");
}

// --- actions -----------------------------------------------------------------------

async function tryPaidCall() {
  const button = $("paid-call");
  button.disabled = true;
  setText("paid-result", "Calling…");
  try {
    const response = await api(urls.paid);
    const body = await response.json();
    const charged = response.headers.get("X-Credits-Charged");
    setText(
      "paid-result",
      `Charged ${charged ? usdc(charged) : "?"} USDC. “${body.quote}”`,
      "success",
    );
  } catch (error) {
    setText("paid-result", error.message, "error");
  } finally {
    button.disabled = false;
  }
  if (shownUser === me) await refresh();
}

function newIdempotencyKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // Pages served over plain http from a non-loopback host lack randomUUID.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

// A fresh key per request, but the same one when the very same request is
// sent again after the network failed: if the first one did land, it is
// replayed instead of crediting twice.
class RetryKey {
  #pending = null;

  for(body) {
    const fingerprint = JSON.stringify(body);
    if (!this.#pending || this.#pending.fingerprint !== fingerprint) {
      this.#pending = { fingerprint, key: newIdempotencyKey() };
    }
    return this.#pending.key;
  }

  settled(error = null) {
    if (!error || !error.retryable) this.#pending = null;
  }
}

const topUpKey = new RetryKey();
const grantKey = new RetryKey();

async function topUp(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const body = {
    user_id: form.elements.user_id.value.trim(),
    amount_usdc: form.elements.amount_usdc.value.trim(),
    description: "Top-up from the billing page",
  };
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  setText("topup-result", "Topping up…");
  try {
    const response = await api(urls.topup, {
      method: "POST",
      headers: { "Idempotency-Key": topUpKey.for(body) },
      body,
    });
    const entry = await response.json();
    topUpKey.settled();
    setText(
      "topup-result",
      `Added ${usdc(entry.amount_usdc)} USDC to ${entry.user_id}. ` +
        `New balance: ${usdc(entry.balance_after_usdc)} USDC.`,
      "success",
    );
    form.elements.amount_usdc.value = "";
    showUser(entry.user_id);
    await refresh();
  } catch (error) {
    topUpKey.settled(error);
    setText("topup-result", error.message, "error");
  } finally {
    submit.disabled = false;
  }
}

// The expiry is picked in the reader's local time; the API gets the instant
// in UTC.
function instantOf(localDateTime) {
  if (!localDateTime) return null;
  const date = new Date(localDateTime);
  return Number.isNaN(date.getTime()) ? localDateTime : date.toISOString();
}

async function giveCredit(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const body = {
    user_id: form.elements.user_id.value.trim(),
    amount_usdc: form.elements.amount_usdc.value.trim(),
    category: "promotional",
    description: "Promotional credit from the billing page",
  };
  const expiresAt = instantOf(form.elements.expires_at.value);
  if (expiresAt) body.expires_at = expiresAt;
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  setText("grant-result", "Giving credit…");
  try {
    const response = await api(urls.grants, {
      method: "POST",
      headers: { "Idempotency-Key": grantKey.for(body) },
      body,
    });
    const grant = await response.json();
    grantKey.settled();
    const until = grant.expires_at ? `, expiring on ${dateTime(grant.expires_at)}` : "";
    setText(
      "grant-result",
      `Gave ${usdc(grant.amount_usdc)} USDC of promotional credit to ${grant.user_id}${until}.`,
      "success",
    );
    form.elements.amount_usdc.value = "";
    form.elements.expires_at.value = "";
    showUser(grant.user_id);
    await refresh();
  } catch (error) {
    grantKey.settled(error);
    setText("grant-result", error.message, "error");
  } finally {
    submit.disabled = false;
  }
}

// The admin's forms follow the account shown.
function showUser(userId) {
  shownUser = userId;
  for (const id of ["account-user", "topup-user", "grant-user"]) $(id).value = userId || "";
}

async function showAccount(event) {
  event.preventDefault();
  showUser(event.currentTarget.elements.user_id.value.trim() || me);
  await refresh();
}

async function loadMore() {
  try {
    await loadHistory();
  } catch (error) {
    setText("history-status", error.message, "error");
  }
}

async function reloadGrants({ reset }) {
  try {
    await loadGrants({ reset });
  } catch (error) {
    setText("grants-status", error.message, "error");
  }
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  window.location.replace(window.location.pathname);
}

// --- start ---------------------------------------------------------------------------

function start() {
  if (!token) {
    showNotice("You are not signed in. Run make demo and open one of the billing links it prints.");
    for (const section of document.querySelectorAll("#billing > section, #billing .columns")) {
      section.hidden = true;
    }
    return;
  }
  $("whoami").textContent = me ? `Signed in as ${me}${isAdmin ? " (admin)" : ""}` : "Signed in";
  $("sign-out").hidden = false;
  $("sign-out").addEventListener("click", signOut);
  $("paid-call").addEventListener("click", tryPaidCall);
  $("load-more").addEventListener("click", loadMore);
  $("grants-more").addEventListener("click", () => reloadGrants({ reset: false }));
  $("grants-all").addEventListener("change", () => reloadGrants({ reset: true }));
  if (isAdmin) {
    $("admin").hidden = false;
    showUser(me);
    $("account-form").addEventListener("submit", showAccount);
    $("topup-form").addEventListener("submit", topUp);
    $("grant-form").addEventListener("submit", giveCredit);
  }
  refresh();
}

start();
