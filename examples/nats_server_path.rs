//! Prints the nats-server binary natster-mount would run (for scripts/test.sh).
fn main() {
    println!("{}", natster_mount::accounts::nats_server_binary().display());
}
