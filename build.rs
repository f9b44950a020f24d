//! Build script. Each part lives in its own file under build/ and is called from here.

#[path = "build/embed.rs"]
mod embed;
#[path = "build/protos.rs"]
mod protos;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    protos::main()?;
    embed::main();
    Ok(())
}
