//! Admission cost: `Ledger::admit` + settle for one of 10,000 agents (target ≤ 200 ns).

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

fn bench(c: &mut Criterion) {
    let n = 10_000;
    let config = config_with_agents(n);
    let ledger = Ledger::new(None);
    let now = Utc::now();
    let ids: Vec<String> = (0..n).map(|i| format!("agent-{i}")).collect();
    for id in &ids {
        let b = config.budget_for(id);
        let _ = ledger.entry(id, &b.period, now, None);
    }
    let mut i = 0usize;
    c.bench_function("admit_10k_agents", |bench| {
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
