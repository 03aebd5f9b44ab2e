//! `switchyard-sim`: the backend simulator as a standalone process.

use clap::Parser;

fn main() {
    let config = switchyard_sim::SimConfig::parse();
    match switchyard_sim::spawn(config.clone()) {
        Ok(addr) => {
            println!(
                "switchyard-sim `{}` listening on http://{addr}",
                config.name
            );
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("switchyard-sim: cannot start on {}: {e}", config.listen);
            std::process::exit(1);
        }
    }
}
