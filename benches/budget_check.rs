//! Admission cost: `Ledger::admit` + settle for one of 10,000 agents (target ≤ 200 ns).
//!
//! Agents are visited with a stride (7919) so that every admission finds its agent's data
//! cold, as with many agents in production. With 10,000 agents the data touched per
//! admission (config index slot, budget, ledger slot, ledger entry, ~620 bytes an agent)
//! outgrows what the development VM keeps in cache and TLB reach, and memory stalls, not
//! instructions, dominate; `admit_1k_agents` is the same admission with the data in reach
//! (numbers and the measurements behind this: benches/README.md, *Admission*).

use budget_proxy::budget::ledger::{Charge, Ledger};
use budget_proxy::config::Config;
use chrono::Utc;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::fmt::Write as _;

fn config_with_agents(n: usize) -> Config {
    let mut agents = String::new();
    for i in 0..n {
        if i > 0 {
            agents.push(',');
        }
        let _ = write!(
            agents,
            r#""agent-{i}": {{"max_tokens": 1000000000, "period": "monthly", "action_on_limit": "block"}}"#
        );
    }
    let text = format!(
        r#"{{"default": {{"max_tokens": 1000, "period": "monthly", "action_on_limit": "warn"}}, "agents": {{{agents}}}}}"#
    );
    match Config::parse(&text, "bench") {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    }
}

/// `n` agents, each with its ledger entry already made (as after their first request).
fn agents(n: usize) -> (Config, Ledger, Vec<String>) {
    let config = config_with_agents(n);
    let ledger = Ledger::new(None);
    let now = Utc::now();
    let ids: Vec<String> = (0..n).map(|i| format!("agent-{i}")).collect();
    for id in &ids {
        let b = config.budget_for(id);
        let _ = ledger.entry(id, &b.period, now, None);
    }
    (config, ledger, ids)
}

/// `budget_for` + `entry` + `admit` (+ the drop of the reservation) for agents visited with
/// the stride, as `admit_10k_agents` always did.
fn bench_admit(c: &mut Criterion, name: &str, n: usize) {
    let (config, ledger, ids) = agents(n);
    let now = Utc::now();
    let mut i = 0usize;
    c.bench_function(name, |bench| {
        bench.iter(|| {
            i = (i + 7919) % n;
            let id = &ids[i];
            let budget = config.budget_for(id);
            let entry = match ledger.entry(id, &budget.period, now, None) {
                Ok(e) => e,
                Err(_) => unreachable!(),
            };
            let a = ledger.admit(&entry, budget, now, black_box(100));
            black_box(a.remaining_tokens);
            a
        })
    });
}

fn bench(c: &mut Criterion) {
    bench_admit(c, "admit_10k_agents", 10_000);
    bench_admit(c, "admit_1k_agents", 1_000);
    let n = 10_000;
    let (config, ledger, ids) = agents(n);
    let now = Utc::now();
    let mut i = 0usize;
    c.bench_function("admit_and_settle_10k_agents", |bench| {
        bench.iter(|| {
            i = (i + 7919) % n;
            let id = &ids[i];
            let budget = config.budget_for(id);
            let entry = match ledger.entry(id, &budget.period, now, None) {
                Ok(e) => e,
                Err(_) => unreachable!(),
            };
            let a = ledger.admit(&entry, budget, now, black_box(100));
            if let Some(r) = a.reservation {
                r.settle(
                    Charge {
                        model: "gemini-2.5-flash".to_string(),
                        prompt_tokens: 10,
                        completion_tokens: 20,
                        cached_tokens: 0,
                        total_tokens: 30,
                        cost_pico: 1,
                    },
                    now,
                );
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches, p);

fn pieces(c: &mut Criterion) {
    let n = 10_000;
    let config = config_with_agents(n);
    let ledger = Ledger::new(None);
    let now = Utc::now();
    let ids: Vec<String> = (0..n).map(|i| format!("agent-{i}")).collect();
    let mut i = 0usize;
    c.bench_function("piece_budget_for", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            black_box(config.budget_for(&ids[i]));
        })
    });
    for id in &ids {
        let _ = ledger.entry(id, &config.budget_for(id).period, now, None);
    }
    c.bench_function("piece_entry", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            let bud = config.budget_for(&ids[i]);
            black_box(ledger.entry(&ids[i], &bud.period, now, None).is_ok());
        })
    });
    c.bench_function("piece_admit", |b| {
        // `admit` (and the reservation's release) alone, entry and budget in hand.
        let budget = config.budget_for(&ids[0]);
        let entry = match ledger.entry(&ids[0], &budget.period, now, None) {
            Ok(e) => e,
            Err(_) => unreachable!(),
        };
        b.iter(|| ledger.admit(&entry, budget, now, black_box(100)))
    });
    c.bench_function("piece_window", |b| {
        b.iter(|| {
            black_box(budget_proxy::budget::period::window(
                &config.default.period,
                black_box(now),
            ));
        })
    });
}
criterion_group!(p, pieces);
