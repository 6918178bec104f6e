//! How much memory a job may use, and bytes shown to people.
//!
//! Every size that comes from a file or a flag is checked against [`limit`] before the
//! allocation it implies, so a hostile or mistaken size is refused with a message instead
//! of aborting with "memory allocation of N bytes failed".

/// Environment variable that overrides the memory limit: a byte count with an optional
/// `K`, `M`, `G` or `T` suffix (powers of 1024), or `none` to switch the check off.
pub const LIMIT_ENV: &str = "HYBRIDIFF_MEMORY_LIMIT";

/// Where a memory limit came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    /// `HYBRIDIFF_MEMORY_LIMIT`.
    Env,
    /// `MemAvailable` in `/proc/meminfo`.
    MemAvailable,
    /// The address-space limit (`ulimit -v`, "Max address space" in `/proc/self/limits`)
    /// less the address space already mapped (`VmSize`).
    AddressSpace,
    /// The cgroup v2 memory limit (`memory.max`) less the cgroup's anonymous memory.
    Cgroup,
}

/// A memory limit in bytes and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes: u128,
    pub source: LimitSource,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source {
            LimitSource::Env => write!(f, "{} ({LIMIT_ENV})", bytes(self.bytes)),
            LimitSource::MemAvailable => write!(
                f,
                "{} (MemAvailable in /proc/meminfo; set {LIMIT_ENV} to override)",
                bytes(self.bytes)
            ),
            LimitSource::AddressSpace => write!(
                f,
                "{} (left under the address-space limit, ulimit -v; set {LIMIT_ENV} to override)",
                bytes(self.bytes)
            ),
            LimitSource::Cgroup => write!(
                f,
                "{} (left under the cgroup's memory.max; set {LIMIT_ENV} to override)",
                bytes(self.bytes)
            ),
        }
    }
}

/// The memory this process may still use: `HYBRIDIFF_MEMORY_LIMIT` when set, else the
/// smallest of `MemAvailable` from `/proc/meminfo`, what is left under the address-space
/// limit (`ulimit -v`) and what is left under the cgroup v2 `memory.max` (Linux). `Ok(None)` when neither is known (other
/// systems) or the variable says `none`; `Err` names a malformed variable.
pub fn limit() -> std::result::Result<Option<Limit>, String> {
    if let Some(v) = std::env::var_os(LIMIT_ENV) {
        let v = v.to_string_lossy();
        if v.trim().eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        return parse_size(&v)
            .map(|bytes| {
                Some(Limit {
                    bytes,
                    source: LimitSource::Env,
                })
            })
            .ok_or_else(|| {
                format!(
                    "{LIMIT_ENV}={v:?}: expected a byte count such as 8G, 512M or 1048576, or none"
                )
            });
    }
    let candidates = [
        (mem_available(), LimitSource::MemAvailable),
        (address_space_left(), LimitSource::AddressSpace),
        (cgroup_left(), LimitSource::Cgroup),
    ];
    Ok(smallest(&candidates))
}

/// The smallest known limit of `candidates`, with its source.
fn smallest(candidates: &[(Option<u128>, LimitSource)]) -> Option<Limit> {
    candidates
        .iter()
        .filter_map(|(b, source)| {
            b.map(|bytes| Limit {
                bytes,
                source: *source,
            })
        })
        .min_by_key(|l| l.bytes)
}

/// The soft address-space limit less what is mapped now; `None` when unlimited.
fn address_space_left() -> Option<u128> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let max = parse_address_space_limit(&limits)?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let mapped = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u128>().ok())
        .map_or(0, |kib| kib * 1024);
    Some(max.saturating_sub(mapped))
}

/// The soft limit of "Max address space" in `/proc/self/limits` text, in bytes.
fn parse_address_space_limit(limits: &str) -> Option<u128> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

/// The tightest cgroup v2 `memory.max` (less the anonymous memory in `memory.stat`) of this process's cgroup
/// and `/sys/fs/cgroup` itself; `None` when all say `max` or there is no cgroup v2.
fn cgroup_left() -> Option<u128> {
    let mut dirs = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") {
        if let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) {
            let rel = rel.trim().trim_start_matches('/');
            if !rel.is_empty() {
                dirs.push(std::path::Path::new("/sys/fs/cgroup").join(rel));
            }
        }
    }
    dirs.iter()
        .filter_map(|d| {
            let max = parse_cgroup_value(&std::fs::read_to_string(d.join("memory.max")).ok()?)?;
            // Anonymous memory only: `memory.current` counts page cache the kernel can
            // drop, which would refuse jobs that fit.
            let used = std::fs::read_to_string(d.join("memory.stat"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("anon "))
                        .and_then(parse_cgroup_value)
                })
                .unwrap_or(0);
            Some(max.saturating_sub(used))
        })
        .min()
}

/// A cgroup memory file's value; `None` for `max` (no limit) or garbage.
fn parse_cgroup_value(text: &str) -> Option<u128> {
    text.trim().parse().ok()
}

fn mem_available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses `123`, `64K`, `512M`, `8G`, `1T` (also `8GiB`, `8gb`; powers of 1024).
pub fn parse_size(s: &str) -> Option<u128> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u128 = n.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u128 << shift)
}

/// `bytes` as people read it: `512 B`, `3.2 MiB`, `17.9 GiB`, `2.1e6 TiB`.
pub fn bytes(b: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    match i {
        0 => format!("{b} B"),
        _ if v >= 1e5 => format!("{v:.1e} {}", UNITS[i]),
        _ => format!("{v:.1} {}", UNITS[i]),
    }
}

/// Refuses `need` bytes when a limit is known and `need` exceeds it; `what` says what
/// the bytes are for ("the weights of unet/", "this job").
pub fn check(what: &str, need: u128) -> std::result::Result<(), String> {
    match limit()? {
        Some(l) if need > l.bytes => Err(format!(
            "{what} needs about {} of memory, more than the {} available",
            bytes(need),
            l
        )),
        _ => Ok(()),
    }
}

/// The product of sizes, saturating instead of overflowing.
fn prod(v: &[usize]) -> u128 {
    v.iter().fold(1u128, |a, &b| a.saturating_mul(b as u128))
}

/// What one denoiser forward needs beyond its weights, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardMemory {
    /// Live activations at the forward's peak: the skip states kept for later layers plus
    /// the working set of the largest layer (im2col buffer, GEMM output, MLP).
    pub activations: u128,
    /// The largest attention score matrices alive at once (scores and softmax, in f32).
    pub attention: u128,
    /// All module outputs of one forward: what a staged runner's cache holds.
    pub module_outputs: u128,
    /// The main activation between modules (an MMDiT's image tokens; a U-Net's
    /// full-resolution state): what a residual cache holds per tensor.
    pub hidden: u128,
}

impl ForwardMemory {
    /// Activations plus attention.
    pub fn peak(&self) -> u128 {
        self.activations.saturating_add(self.attention)
    }
}

/// Estimates a U-Net forward on `batch` samples of `h x w` latents with `ctx_len` text
/// tokens, activations `elem` bytes wide. Upper-bound flavoured: every level is charged
/// its widest layer.
pub fn unet_forward(
    c: &crate::unet::UNetConfig,
    batch: usize,
    (h, w): (usize, usize),
    ctx_len: usize,
    elem: usize,
) -> ForwardMemory {
    let n = c.block_out_channels.len();
    let mut skips = 0u128;
    let mut largest = 0u128;
    let mut attention = 0u128;
    let mut outputs = 0u128;
    for i in 0..n {
        let hw = prod(&[h.div_ceil(1 << i), w.div_ceil(1 << i)]);
        let ch = c.block_out_channels[i];
        let wider = ch.max(*c.block_out_channels.get(i + 1).unwrap_or(&ch));
        let act = |channels: usize| prod(&[batch, channels, elem]).saturating_mul(hw);
        // Down path: one output per resnet plus the downsampler's (counted at this size).
        let level_skips = act(ch).saturating_mul(c.layers_per_block[i] as u128 + 1);
        skips = skips.saturating_add(level_skips);
        // Up path resnets read the concatenation of the state and a skip (about 2x wide)
        // through a 3x3 im2col buffer, and write a few states of the same size.
        let im2col = act(2 * wider).saturating_mul(9);
        let mut layer = im2col.saturating_add(act(wider).saturating_mul(4));
        if c.down_block_types[i] == crate::unet::BlockKind::CrossAttn
            || (i + 1 == n && c.has_mid_block)
        {
            let heads = c.num_attention_heads[i] as u128;
            // GEGLU's projection is 8x the width; scores and softmax are both alive.
            layer = layer.max(act(ch).saturating_mul(10));
            let self_attn = prod(&[batch, 4, 2])
                .saturating_mul(heads)
                .saturating_mul(hw)
                .saturating_mul(hw);
            let cross = prod(&[batch, 4, 2, ctx_len])
                .saturating_mul(heads)
                .saturating_mul(hw);
            attention = attention.max(self_attn.max(cross));
        }
        largest = largest.max(layer);
        outputs = outputs.saturating_add(level_skips.saturating_mul(2));
    }
    let hidden = prod(&[batch, c.block_out_channels[0], elem, h, w]);
    ForwardMemory {
        activations: skips.saturating_add(largest),
        attention,
        module_outputs: outputs,
        hidden,
    }
}

/// Estimates an MMDiT forward on `batch` samples of `h x w` latents with `ctx_len` text
/// tokens, activations `elem` bytes wide.
pub fn mmdit_forward(
    c: &crate::mmdit::MMDiTConfig,
    batch: usize,
    (h, w): (usize, usize),
    ctx_len: usize,
    elem: usize,
) -> ForwardMemory {
    let p = c.patch_size.max(1);
    let tokens = prod(&[h.div_ceil(p), w.div_ceil(p)]);
    let joint = tokens.saturating_add(ctx_len as u128);
    let width = prod(&[batch, c.inner_dim(), elem]);
    // Per block: q, k, v, the attention output and the 4x MLP of both streams, plus the
    // states carried between blocks (image tokens and context).
    let stream = width.saturating_mul(joint);
    let heads = c.num_attention_heads as u128;
    let attention = prod(&[batch, 4, 2])
        .saturating_mul(heads)
        .saturating_mul(joint)
        .saturating_mul(joint);
    ForwardMemory {
        activations: stream.saturating_mul(12),
        attention,
        module_outputs: stream.saturating_mul(c.num_layers as u128),
        hidden: width.saturating_mul(tokens),
    }
}

/// Estimates a VAE decode of one `h x w` latent in `elem`-byte activations: the widest
/// level's im2col buffer and states (the image side doubles at every level while the
/// channels shrink), and the mid block's single-head attention over all latent pixels.
pub fn vae_decode(c: &crate::vae::VaeConfig, (h, w): (usize, usize), elem: usize) -> ForwardMemory {
    let levels = c.block_out_channels.len();
    let mut largest = 0u128;
    for (j, &ch) in c.block_out_channels.iter().rev().enumerate() {
        // Level j runs at the latent size times 2^j, and its upsampler's conv at 2^(j+1).
        let scale = 1usize << (j + usize::from(j + 1 < levels)).min(levels - 1);
        let hw = prod(&[h, w, scale, scale]);
        let act = prod(&[ch, elem]).saturating_mul(hw);
        largest = largest.max(act.saturating_mul(9 + 4));
    }
    let hw = prod(&[h, w]);
    ForwardMemory {
        activations: largest,
        attention: if c.mid_block_add_attention {
            hw.saturating_mul(hw).saturating_mul(4 * 2)
        } else {
            0
        },
        module_outputs: 0,
        hidden: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_limit_applies_and_unlimited_ones_are_ignored() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max stack size            8388608              unlimited            bytes     \n\
                      Max address space         8192000000           unlimited            bytes     \n";
        assert_eq!(parse_address_space_limit(limits), Some(8_192_000_000));
        let unlimited = limits.replace("8192000000  ", "unlimited   ");
        assert_eq!(parse_address_space_limit(&unlimited), None);
        assert_eq!(parse_cgroup_value("max\n"), None);
        assert_eq!(parse_cgroup_value("1073741824\n"), Some(1 << 30));
        let l = smallest(&[
            (Some(16 << 30), LimitSource::MemAvailable),
            (Some(7 << 30), LimitSource::AddressSpace),
            (None, LimitSource::Cgroup),
        ])
        .unwrap();
        assert_eq!(l.bytes, 7 << 30);
        assert_eq!(l.source, LimitSource::AddressSpace);
        assert!(l.to_string().contains("ulimit -v"), "{l}");
        assert_eq!(smallest(&[(None, LimitSource::Cgroup)]), None);
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("8GiB"), Some(8 << 30));
        assert_eq!(parse_size(" 2 T "), Some(2 << 40));
        for bad in ["", "G", "-1", "1.5G", "8X", "12 34"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn estimates_grow_with_size_and_never_overflow() {
        let cfg = crate::unet::UNetConfig::from_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-sdxl/unet/config.json"
        )))
        .unwrap();
        let small = unet_forward(&cfg, 2, (16, 16), 77, 4);
        let big = unet_forward(&cfg, 2, (64, 64), 77, 4);
        assert!(small.peak() > 0 && big.peak() > 8 * small.peak());
        // Level 1 (8x8 = 64 pixels, 4 heads) has the first attention: self-attention
        // scores and softmax of batch 2 in f32, 2 x 4 B x 2 x 4 x 64^2; the cross-attention
        // over 77 tokens is larger still.
        assert_eq!(small.attention, 2 * 4 * 2 * 4 * 64 * 77);
        assert!(small.attention > 2 * 4 * 2 * 4 * 64 * 64);
        let huge = unet_forward(&cfg, 2, (usize::MAX / 2, usize::MAX / 2), usize::MAX, 4);
        assert_eq!(huge.peak(), u128::MAX);
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(u128::MAX).split(' ').nth(1), Some("TiB"));
    }
}
