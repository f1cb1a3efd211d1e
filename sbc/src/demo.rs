//! `sbc demo` (being written).
pub async fn run() -> anyhow::Result<()> {
    anyhow::bail!("demo not written yet")
}
