//! The shared store of several replicas: key layout, the Lua script that applies a
//! replica's batch of changes and hands out leases, and the decoding of its reply.
//! The engine that uses them (batching, leases, pub/sub, failure modes) is
//! [`super::redis_sync`].
//!
//! # Keys (every key of an agent carries the hash tag `{agent}`: one Cluster slot)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `budget:{agent}:<period_start>` | hash | the period's totals: `tokens prompt completion cached requests blocked cost` (pico-USD), the same per model as `<field>@<model>`, and `end` (unix s, empty for infinite); expires [`KEEP_AFTER_PERIOD_SECS`] after the period ends |
//! | `budget:{agent}:<period_start>:leases` | hash | replica id → `tokens:expiry_ms`: budget each replica may hold in reservations and unconfirmed usage |
//! | `budget:{agent}:<period_start>:reset:<ms>` | hash | the totals an admin reset moved aside |
//! | `budget:{agent}:applied` | hash | replica id → number of the last batch applied (exactly-once write-back) |
//! | `budget:{agent}:alert:<period_start>:<threshold>` | string | alert dedupe marker (`SET NX`), expires with the counters |
//! | `budget:alert-id` | string | alert id counter |
//!
//! Pub/sub channel [`EVENTS_CHANNEL`]: usage changed, reset, budget update, alert raised.

use super::{StoreOp, UsageDelta};
use crate::budget::ledger::{ModelTotals, PeriodCounts};
use redis::Value;

/// Seconds counters (and alert markers) are kept after their period ended.
pub const KEEP_AFTER_PERIOD_SECS: i64 = 7 * 86_400;

/// The pub/sub channel replicas talk on.
pub const EVENTS_CHANNEL: &str = "budget:events";

/// The alert id counter.
pub const ALERT_ID_KEY: &str = "budget:alert-id";

/// `budget:{agent}:` — the prefix of every key of `agent`.
pub fn agent_prefix(agent: &str) -> String {
    format!("budget:{{{agent}}}:")
}

/// The counters of `agent`'s period starting at `period_start`.
pub fn counters_key(agent: &str, period_start: i64) -> String {
    format!("budget:{{{agent}}}:{period_start}")
}

/// The exactly-once ledger of `agent` (replica → last batch applied).
pub fn applied_key(agent: &str) -> String {
    format!("budget:{{{agent}}}:applied")
}

/// The alert dedupe marker of (agent, period, threshold).
pub fn alert_key(agent: &str, period_start: i64, threshold: u32) -> String {
    format!("budget:{{{agent}}}:alert:{period_start}:{threshold}")
}

/// Applies one batch of one agent's changes exactly once, then reports the totals of a
/// period and (optionally) renews this replica's lease on it. Every key shares the
/// agent's hash tag (KEYS[1] and the prefix in ARGV[1]), so the script touches one slot.
///
/// Lease rule: a replica asks for `held + want` tokens (`held`: what it holds now in
/// reservations and unconfirmed usage). It gets at least that much when the budget nobody
/// else holds allows (`max − committed − others' leases`), and, far from the limit, up to a
/// fair share `(max − committed) / (2 × holders)` so that it needs no round trip for a
/// while; never more than the unheld budget, and never less than its current lease (it may
/// have admitted requests against it while this call was on its way). `held = 0, want = 0`
/// releases the lease. Usage written back leaves the writer's lease (it is committed now).
pub const SYNC_SCRIPT: &str = r#"
local prefix = ARGV[1]
local keep = tonumber(ARGV[12])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function expire(key, period_end)
  if period_end and period_end ~= '' then
    redis.call('PEXPIREAT', key, (tonumber(period_end) + keep) * 1000)
  end
end

local function lease_of(v)
  local i = string.find(v, ':', 1, true)
  return tonumber(string.sub(v, 1, i - 1)), tonumber(string.sub(v, i + 1))
end

local FIELDS = {'tokens', 'prompt', 'completion', 'cached', 'requests', 'blocked', 'cost'}

local applied = 0
local seq = tonumber(ARGV[3])
if seq > 0 then
  local last = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
  if seq > last then
    applied = 1
    for _, op in ipairs(cjson.decode(ARGV[4])) do
      if op.k == 'add' then
        local key = prefix .. op.p
        for _, f in ipairs(FIELDS) do
          local v = op[f]
          if v and v ~= '0' then
            redis.call('HINCRBY', key, f, v)
            if op.m ~= '' and f ~= 'blocked' then
              redis.call('HINCRBY', key, f .. '@' .. op.m, v)
            end
          end
        end
        redis.call('HSET', key, 'end', op.e)
        expire(key, op.e)
        if op.tokens ~= '0' then
          local lk = key .. ':leases'
          local cur = redis.call('HGET', lk, ARGV[2])
          if cur then
            local tok, exp = lease_of(cur)
            tok = tok - tonumber(op.tokens)
            if tok < 0 then tok = 0 end
            redis.call('HSET', lk, ARGV[2], string.format('%d:%d', tok, exp))
          end
        end
      elseif op.k == 'rekey' then
        local from = prefix .. op.f
        local to = prefix .. op.t
        if from ~= to then
          local flat = redis.call('HGETALL', from)
          for i = 1, #flat, 2 do
            if flat[i] ~= 'end' then
              redis.call('HINCRBY', to, flat[i], flat[i + 1])
            end
          end
          if #flat > 0 then
            redis.call('HSET', to, 'end', op.e)
            expire(to, op.e)
          end
          redis.call('DEL', from)
        end
      elseif op.k == 'reset' then
        local key = prefix .. op.p
        if redis.call('EXISTS', key) == 1 then
          local hist = key .. ':reset:' .. string.format('%d', now)
          redis.call('RENAME', key, hist)
          local e = redis.call('HGET', hist, 'end')
          if e and e ~= '' then
            expire(hist, e)
          else
            redis.call('PEXPIRE', hist, 2592000000)
          end
        end
      end
    end
    redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
    redis.call('PEXPIRE', KEYS[1], 2592000000)
  end
end

local ck = prefix .. ARGV[5]
local lk = ck .. ':leases'
local me = ARGV[7]
local mine, mine_exp, others, holders = 0, 0, 0, 0
local flat = redis.call('HGETALL', lk)
for i = 1, #flat, 2 do
  local tok, exp = lease_of(flat[i + 1])
  if exp <= now then
    redis.call('HDEL', lk, flat[i])
  elseif flat[i] == me then
    mine, mine_exp = tok, exp
  else
    others = others + tok
    holders = holders + 1
  end
end
local held = tonumber(ARGV[8])
if held >= 0 then
  local want = tonumber(ARGV[9])
  local grant = 0
  if held > 0 or want > 0 then
    local remaining = tonumber(ARGV[10]) - tonumber(redis.call('HGET', ck, 'tokens') or '0')
    local target = held + want
    local share = math.floor(remaining / (2 * (holders + 1)))
    if share > target then target = share end
    if target > remaining - others then target = remaining - others end
    -- A renewal never takes back what this replica was granted: it may have admitted
    -- requests against it since it sent `held` (its lease shrinks through write-back,
    -- expiry, or a release, for which it stops admitting first).
    if target < mine then target = mine end
    if target > 0 then grant = target end
  end
  if grant > 0 then
    mine, mine_exp = grant, now + tonumber(ARGV[11])
    redis.call('HSET', lk, me, string.format('%d:%d', mine, mine_exp))
    redis.call('PEXPIRE', lk, 2 * tonumber(ARGV[11]))
  else
    mine, mine_exp = 0, 0
    redis.call('HDEL', lk, me)
  end
end
local ttl = 0
if mine_exp > now then ttl = mine_exp - now end
return {applied, redis.call('HGETALL', ck), mine, ttl, others, holders}
"#;

/// One op of a batch as the script reads it (numbers as strings: exact beyond 2^53).
pub fn op_json(op: &StoreOp) -> Option<serde_json::Value> {
    use serde_json::json;
    let end = |e: Option<i64>| e.map(|e| e.to_string()).unwrap_or_default();
    match op {
        StoreOp::Add(d) => Some(json!({
            "k": "add",
            "p": d.period_start.to_string(),
            "e": end(d.period_end),
            "m": d.model,
            "tokens": d.total_tokens.to_string(),
            "prompt": d.prompt_tokens.to_string(),
            "completion": d.completion_tokens.to_string(),
            "cached": d.cached_tokens.to_string(),
            "requests": d.requests.to_string(),
            "blocked": d.blocked.to_string(),
            // HINCRBY is 64-bit: a single delta above 9.2 million USD saturates.
            "cost": i64::try_from(d.cost_pico).unwrap_or(i64::MAX).to_string(),
        })),
        StoreOp::Rekey {
            from_start,
            to_start,
            to_end,
            ..
        } => Some(json!({
            "k": "rekey",
            "f": from_start.to_string(),
            "t": to_start.to_string(),
            "e": end(*to_end),
        })),
        StoreOp::Reset { period_start, .. } => Some(json!({
            "k": "reset",
            "p": period_start.to_string(),
        })),
        StoreOp::Alert(_) => None,
    }
}

/// The agent an op is about (`None`: alerts, which do not go to the counters).
pub fn op_agent(op: &StoreOp) -> Option<&str> {
    match op {
        StoreOp::Add(d) => Some(&d.agent),
        StoreOp::Rekey { agent, .. } | StoreOp::Reset { agent, .. } => Some(agent),
        StoreOp::Alert(_) => None,
    }
}

/// Merge `Add`s to the same (period, model) that no rekey or reset separates.
pub fn coalesce(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut out: Vec<StoreOp> = Vec::with_capacity(ops.len());
    let mut index: std::collections::HashMap<(i64, String), usize> = Default::default();
    for op in ops {
        match op {
            StoreOp::Add(d) => match index.get(&(d.period_start, d.model.clone())) {
                Some(&i) => {
                    if let Some(StoreOp::Add(acc)) = out.get_mut(i) {
                        add_into(acc, &d);
                    }
                }
                None => {
                    index.insert((d.period_start, d.model.clone()), out.len());
                    out.push(StoreOp::Add(d));
                }
            },
            StoreOp::Alert(_) => {}
            other => {
                index.clear();
                out.push(other);
            }
        }
    }
    out
}

fn add_into(acc: &mut UsageDelta, d: &UsageDelta) {
    acc.period_end = d.period_end;
    acc.prompt_tokens += d.prompt_tokens;
    acc.completion_tokens += d.completion_tokens;
    acc.cached_tokens += d.cached_tokens;
    acc.total_tokens += d.total_tokens;
    acc.requests += d.requests;
    acc.blocked += d.blocked;
    acc.cost_pico += d.cost_pico;
}

/// What the script answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReply {
    /// Whether the batch was applied now (false: there was none, or it was applied before).
    pub applied: bool,
    /// The totals of the period asked about.
    pub totals: PeriodCounts,
    /// This replica's lease on it.
    pub lease: u64,
    /// Milliseconds the lease has left.
    pub lease_ttl_ms: u64,
    /// Tokens leased to other replicas.
    pub others: u64,
    /// Other replicas holding a lease.
    pub holders: u64,
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Totals from a counters hash (`HGETALL` as a flat list of field, value).
pub fn parse_totals(flat: &[(String, String)]) -> PeriodCounts {
    let mut c = PeriodCounts::default();
    for (field, value) in flat {
        let (name, model) = match field.split_once('@') {
            Some((n, m)) => (n, Some(m)),
            None => (field.as_str(), None),
        };
        if name == "end" {
            continue;
        }
        let n: i128 = value.parse().unwrap_or(0);
        let u = u64::try_from(n.max(0)).unwrap_or(u64::MAX);
        let cost = u128::try_from(n.max(0)).unwrap_or(0);
        match model {
            None => match name {
                "tokens" => c.total_tokens = u,
                "prompt" => c.prompt_tokens = u,
                "completion" => c.completion_tokens = u,
                "cached" => c.cached_tokens = u,
                "requests" => c.requests = u,
                "blocked" => c.blocked = u,
                "cost" => c.cost_pico = cost,
                _ => {}
            },
            Some(m) => {
                let t: &mut ModelTotals = c.by_model.entry(m.to_string()).or_default();
                match name {
                    "tokens" => t.total_tokens = u,
                    "prompt" => t.prompt_tokens = u,
                    "completion" => t.completion_tokens = u,
                    "cached" => t.cached_tokens = u,
                    "requests" => t.requests = u,
                    "cost" => t.cost_pico = cost,
                    _ => {}
                }
            }
        }
    }
    c
}

/// Decode the script's reply.
pub fn parse_reply(v: &Value) -> Option<SyncReply> {
    let Value::Array(items) = v else { return None };
    let [applied, flat, lease, ttl, others, holders] = items.as_slice() else {
        return None;
    };
    let Value::Array(flat) = flat else {
        return None;
    };
    let pairs: Vec<(String, String)> = flat
        .chunks(2)
        .filter_map(|c| Some((text(c.first()?)?, text(c.get(1)?)?)))
        .collect();
    let u = |v: &Value| int(v).map(|i| u64::try_from(i).unwrap_or(0));
    Some(SyncReply {
        applied: int(applied)? == 1,
        totals: parse_totals(&pairs),
        lease: u(lease)?,
        lease_ttl_ms: u(ttl)?,
        others: u(others)?,
        holders: u(holders)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_agent_hash_tag() {
        assert_eq!(
            counters_key("sage", 1_700_000_000),
            "budget:{sage}:1700000000"
        );
        assert_eq!(applied_key("sage"), "budget:{sage}:applied");
        assert_eq!(alert_key("sage", 5, 90), "budget:{sage}:alert:5:90");
        assert!(counters_key("a.b-c", 1).starts_with(&agent_prefix("a.b-c")));
    }

    #[test]
    fn totals_parse_with_models() {
        let flat: Vec<(String, String)> = [
            ("tokens", "30"),
            ("prompt", "10"),
            ("completion", "20"),
            ("requests", "1"),
            ("blocked", "2"),
            ("cost", "123456789012345678"),
            ("tokens@gemini-2.5-flash", "30"),
            ("requests@gemini-2.5-flash", "1"),
            ("end", "1800000000"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let t = parse_totals(&flat);
        assert_eq!(t.total_tokens, 30);
        assert_eq!(t.blocked, 2);
        assert_eq!(t.cost_pico, 123_456_789_012_345_678);
        assert_eq!(t.by_model["gemini-2.5-flash"].total_tokens, 30);
        assert_eq!(t.by_model["gemini-2.5-flash"].requests, 1);
    }

    #[test]
    fn coalesce_merges_adds_between_resets() {
        let add = |tokens| {
            StoreOp::Add(UsageDelta {
                agent: "a".into(),
                period_start: 1,
                model: "m".into(),
                total_tokens: tokens,
                requests: 1,
                ..Default::default()
            })
        };
        let reset = StoreOp::Reset {
            agent: "a".into(),
            period_start: 1,
        };
        let out = coalesce(vec![add(1), add(2), reset.clone(), add(4)]);
        assert_eq!(out.len(), 3);
        let StoreOp::Add(d) = &out[0] else { panic!() };
        assert_eq!((d.total_tokens, d.requests), (3, 2));
        assert_eq!(out[1], reset);
    }
}
