//! Seeds sessions straight into a gateway's stores, for the scaling
//! benchmark: a million sessions through the admin API take the better
//! part of an hour on a small machine; through the store, minutes.
//!
//! ```text
//! cargo run --release --example seed_sessions -- CONFIG COUNT TOKENS_OUT [USER_PREFIX]
//! ```
//!
//! Opens the stores CONFIG names (as `sessiongate serve` would: migrations,
//! the token MAC key from `session.token_secret` or the durable store),
//! creates COUNT sessions, one per user `USER_PREFIX-<i>`, in both tiers,
//! and writes `token<TAB>user` lines to TOKENS_OUT. Policies are not run:
//! this fills stores, it does not log anyone in. With the in-process fast
//! tier, only the durable tier keeps what this process wrote; the gateway
//! restores each session on its first lookup.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use sessiongate::config::Config;
use sessiongate::metrics::Metrics;
use sessiongate::session::Session;
use sessiongate::token::TokenKey;

const IN_FLIGHT: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, count, out, rest @ ..] = args.as_slice() else {
        return Err("usage: seed_sessions CONFIG COUNT TOKENS_OUT [USER_PREFIX]".into());
    };
    let prefix = rest.first().map(String::as_str).unwrap_or("seed");
    let count: usize = count.parse()?;
    let config = Config::load(Path::new(config)).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = sessiongate::server::open_store(&config, Arc::new(Metrics::new())).await?;
        let secret = match &config.session.token_secret {
            Some(secret) => secret.clone(),
            None => {
                store
                    .durable()
                    .secret("token_mac_key", &TokenKey::generate_secret())
                    .await?
            }
        };
        let key = Arc::new(TokenKey::new(&secret));
        let ttl = config.session.default_ttl;
        let started = Instant::now();
        let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
        let mut created = futures_util::stream::iter(0..count)
            .map(|i| {
                let store = store.clone();
                let key = key.clone();
                async move {
                    let user = format!("{prefix}-{i}");
                    let (token, hash) = key.issue();
                    let session = Session::new(user.clone(), BTreeMap::new(), ttl);
                    store.create(&hash, session).await.map(|_| (token, user))
                }
            })
            .buffer_unordered(IN_FLIGHT);
        let mut done = 0usize;
        while let Some(result) = created.next().await {
            let (token, user) = result?;
            writeln!(file, "{token}\t{user}")?;
            done += 1;
            if done.is_multiple_of(100_000) {
                eprintln!("seed_sessions: {done} of {count}");
            }
        }
        file.flush()?;
        let elapsed = started.elapsed().as_secs_f64();
        eprintln!(
            "seed_sessions: {count} sessions in {elapsed:.1} s ({:.0}/s)",
            count as f64 / elapsed
        );
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
