//! Build script. Each part lives in its own file under build/ and is called from here.

#[path = "build/embed.rs"]
mod embed;

fn main() {
    embed::main();
}
