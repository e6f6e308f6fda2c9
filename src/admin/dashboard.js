// budget-proxy live dashboard (served at / on the admin port by src/admin/dashboard.rs).
// Reads the admin API every two seconds and shows every agent's budget and the newest
// alerts. Everything that comes from the API is written with textContent, never as HTML.
'use strict';

const REFRESH_MS = 2000;
const ALERTS_SHOWN = 20;
const TOKEN_KEY = 'budget-proxy-admin-token';

let token = sessionStorage.getItem(TOKEN_KEY) || '';
let timer = null;

// A token given in the address (#token=…) is kept for the tab and taken out of the address
// bar, history and anything copied from it.
function tokenFromAddress() {
  const m = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (!m) return false;
  token = decodeURIComponent(m[1]);
  sessionStorage.setItem(TOKEN_KEY, token);
  history.replaceState(null, '', location.pathname + location.search);
  return true;
}
tokenFromAddress();

const $ = (id) => document.getElementById(id);

function setState(text, error) {
  const s = $('state');
  s.textContent = text;
  s.className = error ? 'error' : '';
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path) {
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  const r = await fetch(path, { headers, cache: 'no-store' });
  if (!r.ok) {
    let message = r.status + ' ' + r.statusText;
    try { message = (await r.json()).error.message || message; } catch (_) { /* not JSON */ }
    throw new HttpError(r.status, message);
  }
  return r.json();
}

const integer = new Intl.NumberFormat('en-US');
const dollars = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD', minimumFractionDigits: 2, maximumFractionDigits: 4 });

function duration(seconds) {
  if (seconds === null || seconds === undefined) return 'never';
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600), m = Math.floor(seconds % 3600 / 60);
  if (d > 0) return d + 'd ' + h + 'h';
  if (h > 0) return h + 'h ' + m + 'm';
  return m + 'm ' + (seconds % 60) + 's';
}

// A table cell: what it shows, and the raw value in data-value (for scripts and tests).
function cell(row, field, text, value, numeric) {
  const td = document.createElement('td');
  td.dataset.field = field;
  td.dataset.value = String(value);
  td.textContent = text;
  if (numeric) td.className = 'n';
  row.appendChild(td);
  return td;
}

function agentRow(s) {
  const tr = document.createElement('tr');
  tr.dataset.agent = s.agent_id;
  tr.dataset.health = s.health;
  const name = cell(tr, 'agent_id', s.agent_id, s.agent_id);
  name.title = [s.description, 'priority ' + s.priority].filter(Boolean).join(' · ');

  const used = cell(tr, 'used_tokens', '', s.used_tokens);
  const bar = document.createElement('span');
  bar.className = 'bar';
  const fill = document.createElement('span');
  fill.className = 'bg-' + s.health;
  fill.style.width = Math.min(100, s.percentage) + '%';
  bar.appendChild(fill);
  used.appendChild(bar);
  used.appendChild(document.createTextNode(integer.format(s.used_tokens) + ' / ' + integer.format(s.max_tokens)));
  used.title = 'prompt ' + integer.format(s.prompt_tokens) + ' (cached ' + integer.format(s.cached_tokens) +
    '), completion ' + integer.format(s.completion_tokens) + ', reserved ' + integer.format(s.reserved_tokens);

  cell(tr, 'percentage', s.percentage.toFixed(1), s.percentage, true);
  cell(tr, 'health', s.health, s.health).classList.add('health', s.health);
  const action = s.action_on_limit + (s.action_on_limit === 'degrade' && s.fallback_model ? ' → ' + s.fallback_model : '');
  cell(tr, 'action_on_limit', action, s.action_on_limit);
  cell(tr, 'period', s.period, s.period);
  cell(tr, 'resets_in_seconds', duration(s.resets_in_seconds), s.resets_in_seconds);
  cell(tr, 'requests', integer.format(s.requests), s.requests, true);
  cell(tr, 'blocked', integer.format(s.blocked), s.blocked, true);
  cell(tr, 'queued', integer.format(s.queued), s.queued, true);
  cell(tr, 'estimated_cost_usd', dollars.format(s.estimated_cost_usd), s.estimated_cost_usd, true);
  const projected = s.projected_cost_usd;
  cell(tr, 'projected_cost_usd', projected === null ? '—' : dollars.format(projected), projected, true);
  return tr;
}

function alertRow(a) {
  const tr = document.createElement('tr');
  tr.dataset.alert = a.id;
  cell(tr, 'created_at', new Date(a.created_at).toLocaleString(), a.created_at);
  cell(tr, 'agent_id', a.agent_id, a.agent_id);
  const level = { warning: 'warning', critical: 'critical', limit: 'exceeded' }[a.level] || '';
  cell(tr, 'level', a.level, a.level).classList.add('health', level);
  cell(tr, 'percentage', Number(a.percentage).toFixed(1), a.percentage, true);
  cell(tr, 'message', a.message, a.message);
  return tr;
}

function render(status, alerts) {
  const agents = Object.values(status.agents);
  // The ones closest to their limit first.
  agents.sort((a, b) => b.percentage - a.percentage || a.agent_id.localeCompare(b.agent_id));
  $('agents').replaceChildren(...agents.map(agentRow));

  const count = (h) => agents.filter((s) => s.health === h).length;
  $('sum-agents').textContent = integer.format(agents.length);
  $('sum-tokens').textContent = integer.format(agents.reduce((t, s) => t + s.used_tokens, 0));
  $('sum-cost').textContent = dollars.format(agents.reduce((t, s) => t + s.estimated_cost_usd, 0));
  $('sum-projected').textContent = dollars.format(agents.reduce((t, s) => t + (s.projected_cost_usd || 0), 0));
  $('sum-health').textContent = count('warning') + ' / ' + count('critical') + ' / ' + count('exceeded');

  $('alerts').replaceChildren(...alerts.alerts.map(alertRow));
  $('no-alerts').hidden = alerts.alerts.length > 0;
}

function askForToken(why) {
  clearTimeout(timer);
  $('data').hidden = true;
  $('login').hidden = false;
  $('login-why').textContent = why;
  $('token').focus();
  setState('waiting for the admin token', true);
}

async function refresh() {
  clearTimeout(timer);
  try {
    // One after the other: a wrong token then counts once against the admin port's limit
    // of ten failures a minute, not twice.
    const status = await api('/api/budget/status');
    const alerts = await api('/api/budget/alerts?limit=' + ALERTS_SHOWN);
    render(status, alerts);
    $('login').hidden = true;
    $('data').hidden = false;
    document.body.dataset.updated = status.generated_at;
    setState('live · updated ' + new Date().toLocaleTimeString());
  } catch (e) {
    if (e instanceof HttpError && e.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      return askForToken(token ? 'That token was refused. Enter the admin token.' : 'The admin API needs its token.');
    }
    if (e instanceof HttpError && e.status === 429) {
      return askForToken('Too many wrong tokens from this address: wait a minute, then enter the right one.');
    }
    // The proxy restarting or unreachable: keep the last figures and try again.
    setState('cannot reach the admin API (' + e.message + '); retrying', true);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

$('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  token = $('token').value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $('token').value = '';
  refresh();
});

// A token pasted into the address of the open page (no reload) is taken too.
window.addEventListener('hashchange', () => { if (tokenFromAddress()) refresh(); });

refresh();
