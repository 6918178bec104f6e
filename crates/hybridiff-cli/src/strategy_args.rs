//! The run flags that `generate`, `denoise`, `bench` and `serve` share.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use anyhow::Result;
use hybridiff_engine::cache::CacheSpec;
use hybridiff_engine::switch::{self, PartialSwitch, ResolvedSwitch};
use hybridiff_engine::StrategyKind;
use hybridiff_engine::{PipelinedGuidance, StrategyOptions};

/// The flags given on this process's command line (or through their environment variable),
/// by clap id (the field name: `tau_cap` for `--tau-cap`); flags left at their default are
/// not in it. Set once by `main`; empty when unset (unit tests).
#[derive(Debug, Default, Clone)]
pub struct Given(BTreeSet<String>);

static GIVEN: OnceLock<Given> = OnceLock::new();

impl Given {
    /// The flags of a subcommand's matches that were given (not defaulted).
    pub fn from_matches(m: &clap::ArgMatches) -> Self {
        use clap::parser::ValueSource;
        Self(
            m.ids()
                .filter(|id| {
                    matches!(
                        m.value_source(id.as_str()),
                        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                    )
                })
                .map(|id| id.as_str().to_string())
                .collect(),
        )
    }

    /// Records this process's flags (the first call wins).
    pub fn set(self) {
        let _ = GIVEN.set(self);
    }

    /// This process's flags.
    pub fn get() -> &'static Given {
        static EMPTY: OnceLock<Given> = OnceLock::new();
        GIVEN
            .get()
            .unwrap_or_else(|| EMPTY.get_or_init(Given::default))
    }

    /// The ids of the given flags.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Whether the flag with clap id `id` was given.
    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }

    /// The given flags among `ids`, as `--flag` names.
    pub fn among(&self, ids: &[&str]) -> Vec<String> {
        ids.iter()
            .filter(|id| self.has(id))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect()
    }
}

/// A strategy flag and the strategies that read it.
pub struct FlagUse {
    /// The clap id (the field of [`StrategyArgs`] or of a command's arguments).
    pub id: &'static str,
    /// Whether a run of this strategy, with these flags, reads the flag.
    pub used_by: fn(StrategyKind, &StrategyArgs) -> bool,
    /// Those strategies in words, for the message.
    pub users: &'static str,
}

/// Which strategy reads which flag. A flag given for a run whose strategy (or, for `bench`,
/// none of whose `--strategies`) reads it is refused before anything is loaded, rather than
/// ignored (issue 28). A new strategy flag is one line here.
pub const STRATEGY_FLAGS: &[FlagUse] = &[
    FlagUse {
        id: "warmup",
        used_by: |k, a| {
            let mode = a.patch_mode.as_deref();
            k == StrategyKind::Async
                || (k == StrategyKind::Patch && mode.unwrap_or("displaced") == "displaced")
                || (k == StrategyKind::Hybrid && mode == Some("displaced"))
        },
        users:
            "async, patch with --patch-mode displaced (its default) and hybrid with --patch-mode displaced",
    },
    FlagUse {
        id: "stride",
        used_by: |k, _| k == StrategyKind::Async,
        users: "async",
    },
    FlagUse {
        id: "patch_mode",
        used_by: |k, _| {
            matches!(
                k,
                StrategyKind::Patch | StrategyKind::Hybrid | StrategyKind::Cfg
            )
        },
        users: "patch, cfg (sync) and hybrid's exact steps",
    },
    FlagUse {
        id: "pipeline_layout",
        used_by: |k, _| k == StrategyKind::Hybrid,
        users: "hybrid",
    },
    FlagUse {
        id: "no_cfg_split",
        used_by: |k, _| k == StrategyKind::Patch,
        users: "patch",
    },
    FlagUse {
        id: "l_slope",
        used_by: |k, _| k == StrategyKind::Hybrid,
        users: "hybrid",
    },
    FlagUse {
        id: "eps_slope",
        used_by: |k, _| k == StrategyKind::Hybrid,
        users: "hybrid",
    },
    FlagUse {
        id: "k",
        used_by: |k, _| k == StrategyKind::Hybrid,
        users: "hybrid",
    },
    FlagUse {
        id: "tau_cap",
        used_by: |k, _| k == StrategyKind::Hybrid,
        users: "hybrid",
    },
    FlagUse {
        id: "stages",
        used_by: |k, _| matches!(k, StrategyKind::Async | StrategyKind::Hybrid),
        users: "async and hybrid",
    },
    FlagUse {
        id: "pipelined_guidance",
        used_by: |k, _| k == StrategyKind::Hybrid,
        users: "hybrid",
    },
    // serial is one rank: it never waits for another.
    FlagUse {
        id: "comm_timeout",
        used_by: |k, _| k != StrategyKind::Serial,
        users: "the strategies of more than one rank (all but serial)",
    },
];

/// Refuses every flag of [`STRATEGY_FLAGS`] that was given but that no strategy of `kinds`
/// reads. `what` names where the strategies came from (`--strategy cfg`, `--strategies
/// serial,cfg`).
pub fn check_flags_used(
    given: &Given,
    kinds: &[StrategyKind],
    args: &StrategyArgs,
    what: &str,
) -> Result<()> {
    let unused: Vec<String> = STRATEGY_FLAGS
        .iter()
        .filter(|f| given.has(f.id) && !kinds.iter().any(|&k| (f.used_by)(k, args)))
        .map(|f| {
            format!(
                "--{}: {what} does not use it (read by {}); leave it out or pick a strategy that reads it",
                f.id.replace('_', "-"),
                f.users
            )
        })
        .collect();
    if !unused.is_empty() {
        anyhow::bail!("{}", unused.join("\n"));
    }
    Ok(())
}

/// Knobs of the staged strategies (`async`, `hybrid`) and of `patch`.
#[derive(clap::Args, Debug, Clone)]
pub struct StrategyArgs {
    /// async: exact steps before pipelining; patch and hybrid with displaced bands:
    /// synchronous steps before other bands' activations are taken from the previous step.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// async: AsyncDiff's stride, 1 (n = W stages, one per rank, every step) or 2 (n = W - 1
    /// stages plus a rank that computes the last stage again; each rank computes once per
    /// two steps).
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Bands inside each CFG branch group: `displaced` (DistriFusion: other bands' halos,
    /// GroupNorm statistics and keys/values from the previous step, exchanged asynchronously)
    /// or `sync` (exact) [default: displaced for patch; sync for hybrid's exact steps; cfg
    /// takes sync only].
    #[arg(long)]
    pub patch_mode: Option<String>,
    /// hybrid, pipelined steps on W = 2P ranks: `across` (2P stages over both branch groups,
    /// one unguided prediction: the paper's layout; the fastest) or `per-branch` (P stages
    /// per branch group, both branches, guided; P >= 2: better images, cfg's speed, fewer
    /// bytes than cfg on slow links) [default: across; see docs/benchmarks/scale-out.md].
    #[arg(long)]
    pub pipeline_layout: Option<String>,
    /// patch: run both CFG branches on every rank (W = bands) instead of one rank group
    /// per branch (W = 2 x bands).
    #[arg(long)]
    pub no_cfg_split: bool,
    /// hybrid: window L of the rel-MAE slope [default: the model folder's hybridiff.json,
    /// else the paper's SDXL 12 for 50 steps; either scaled to --steps].
    #[arg(long)]
    pub l_slope: Option<usize>,
    /// hybrid: slope below which the rel-MAE curve counts as flat [default: hybridiff.json,
    /// else 0.4e-3 for 50 steps; either scaled to --steps].
    #[arg(long, allow_hyphen_values = true)]
    pub eps_slope: Option<f64>,
    /// hybrid: pipelined steps after tau1 [default: hybridiff.json, else 5 for 50 steps;
    /// either scaled to --steps and fitted into it].
    #[arg(long)]
    pub k: Option<usize>,
    /// hybrid: tau1 when no flattening is seen before this step [default: hybridiff.json,
    /// else 15 for 50 steps; either scaled to --steps and fitted into it].
    #[arg(long)]
    pub tau_cap: Option<usize>,
    /// async, hybrid: stage plan, `reference` (the authors' presets: SDXL n=2/4, even DiT
    /// splits), `auto` (balanced by counted FLOPs), `measured` (balanced by module times
    /// measured before the run), or `default` (reference where one exists, else auto)
    /// [default: the model folder's hybridiff.json, else default].
    #[arg(long)]
    pub stages: Option<String>,
    /// hybrid: prediction in pipelined steps, `none` (reference) or `reuse` (add the
    /// last exact step's guidance correction) [default: the model folder's hybridiff.json,
    /// else none].
    #[arg(long)]
    pub pipelined_guidance: Option<String>,
    /// Step caching, every strategy [default: off]: `deepcache[:interval=N,branch=B,warmup=W]`
    /// (U-Nets: cached steps run only the shallow branch), `teacache[:threshold=T,warmup=W]`
    /// (MMDiTs: cached steps reuse the blocks' residual; U-Nets: the last prediction),
    /// `default` (what the model folder's hybridiff.json recommends) or `none`.
    #[arg(long, value_name = "METHOD[:KEY=VALUE,...]")]
    pub cache: Option<String>,
}

impl StrategyArgs {
    /// The engine's strategy options for a run of `steps` steps: flags first, then the
    /// model's recommendations, then the paper's values, the last two scaled to `steps`
    /// (see [`switch::resolve`]). Also returns the resolved thresholds, with the line that
    /// says where they came from. The flags' domains are checked whatever the strategy.
    pub fn options(
        &self,
        defaults: &ModelDefaults,
        steps: usize,
    ) -> Result<(StrategyOptions, ResolvedSwitch)> {
        let flags = PartialSwitch {
            l_slope: self.l_slope,
            eps_slope: self.eps_slope,
            k: self.k,
            tau_cap: self.tau_cap,
        };
        flags.check_domains(None)?;
        let resolved = switch::resolve(flags, defaults.switch(), defaults.steps, steps);
        Ok((
            StrategyOptions {
                warmup: self.warmup,
                stride: self.stride,
                switch: resolved.params,
                stages: defaults.stages(self.stages.as_deref())?,
                pipelined_guidance: defaults
                    .pipelined_guidance(self.pipelined_guidance.as_deref())?,
                patch_mode: self.patch_mode.as_deref().map(str::parse).transpose()?,
                pipeline_layout: self
                    .pipeline_layout
                    .as_deref()
                    .or(defaults.pipeline_layout.as_deref())
                    .map(str::parse)
                    .transpose()?,
                cfg_split: !self.no_cfg_split,
                cache: self.cache(defaults, steps)?.map(|(c, _)| c),
            },
            resolved,
        ))
    }

    /// `--cache`: the method and parameters given, or (`default`) the model's
    /// recommendation for a run of `steps` steps (its `warmup` scaled from the recommended
    /// steps, as the switching thresholds are), with a line saying where it came from;
    /// `None` without the flag or with `none`.
    pub fn cache(
        &self,
        defaults: &ModelDefaults,
        steps: usize,
    ) -> Result<Option<(CacheSpec, String)>> {
        match self.cache.as_deref().map(str::trim) {
            None | Some("none") => Ok(None),
            Some("default") => {
                match &defaults.cache {
                    Some(c) => {
                        let file = defaults
                            .path
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "hybridiff.json".into());
                        let (spec, how) = match defaults.steps {
                        Some(tuned) if tuned != steps => (
                            c.scaled_to(tuned, steps),
                            format!("{c} for {tuned} steps from {file}, warmup scaled to {steps} steps"),
                        ),
                        _ => (*c, format!("from {file}")),
                    };
                        Ok(Some((spec, format!("--cache default: {spec} ({how})"))))
                    }
                    None => anyhow::bail!(
                    "--cache default: {} recommends no cache (no `cache` key); give a method: {}",
                    defaults
                        .path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "the model folder has no hybridiff.json, so it".into()),
                    hybridiff_engine::cache::METHODS
                ),
                }
            }
            Some(s) => {
                let spec = CacheSpec::parse(s, "--cache")?;
                Ok(Some((spec, format!("--cache {spec}"))))
            }
        }
    }
}

/// Says on stderr what a run will do that the user may not expect, before it starts:
/// that `cfg`/`hybrid` have no branches to split without CFG (`guidance <= 1`), or which
/// hybrid thresholds were derived. Hybrid thresholds that cannot fit are an error that
/// names the values that were derived rather than given.
pub fn announce(
    kinds: &[StrategyKind],
    strategies: &[&dyn hybridiff_engine::Strategy],
    switch: &ResolvedSwitch,
    guidance: f64,
    steps: usize,
    print: bool,
) -> Result<()> {
    for (kind, strategy) in kinds.iter().zip(strategies) {
        let line = match kind {
            StrategyKind::Cfg | StrategyKind::Hybrid if guidance <= 1.0 => {
                Some(format!("{kind}: {}", strategy.without_cfg()))
            }
            StrategyKind::Hybrid => {
                switch.check(steps)?;
                Some(switch.note.clone())
            }
            _ => None,
        };
        if let (true, Some(line)) = (print, line) {
            eprintln!("hybridiff: {line}");
        }
    }
    Ok(())
}

/// Recommended settings a model folder may carry in `hybridiff.json` (written by hand or by
/// `hybridiff tune`).
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l_slope: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps_slope: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau_cap: Option<usize>,
    /// `--stages` (async, hybrid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<String>,
    /// `--pipelined-guidance` (hybrid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipelined_guidance: Option<String>,
    /// `--pipeline-layout` (hybrid at 4 and 8 ranks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_layout: Option<String>,
    /// What `hybridiff tune` measured for these values (world size, floor, quality, speedup,
    /// runs); a record for people, not read by runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tune: Option<serde_json::Value>,
    /// The step cache `--cache default` takes, as `--cache` writes it.
    #[serde(
        default,
        deserialize_with = "cache_key",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache: Option<CacheSpec>,
    /// The file it was read from.
    #[serde(skip)]
    pub path: Option<std::path::PathBuf>,
}

/// `cache` as a `--cache` string; read as a string first so that a bad value is named by
/// the caller with the file and the key.
fn cache_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<CacheSpec>, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    s.map(|s| CacheSpec::parse(&s, "key `cache`"))
        .transpose()
        .map_err(serde::de::Error::custom)
}

impl ModelDefaults {
    /// Reads `<dir>/hybridiff.json`; none is no recommendation.
    pub fn read(dir: &std::path::Path) -> Result<Self> {
        use anyhow::Context;
        let p = dir.join("hybridiff.json");
        if !p.is_file() {
            return Ok(Self::default());
        }
        let text = hybridiff_models::weights::read_text_bounded(
            &p,
            hybridiff_models::weights::MAX_CONFIG_BYTES,
        )
        .with_context(|| format!("reading {}", p.display()))?;
        let mut d: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{steps, guidance, l_slope, eps_slope, k, tau_cap, stages, pipelined_guidance, pipeline_layout, cache, tune}}",
                p.display()
            )
        })?;
        if let Some(s) = &d.stages {
            s.parse::<hybridiff_engine::stages::PlanKind>()
                .with_context(|| format!("{}: `stages` = {s:?}", p.display()))?;
        }
        if let Some(g) = &d.pipelined_guidance {
            g.parse::<PipelinedGuidance>()
                .with_context(|| format!("{}: `pipelined_guidance` = {g:?}", p.display()))?;
        }
        if let Some(l) = &d.pipeline_layout {
            l.parse::<hybridiff_engine::strategy::hybrid::PipelineLayout>()
                .with_context(|| format!("{}: `pipeline_layout` = {l:?}", p.display()))?;
        }
        d.path = Some(p.clone());
        if d.steps == Some(0) {
            anyhow::bail!("{}: `steps` = 0: expected 1 or more", p.display());
        }
        if let Some(g) = d.guidance {
            hybridiff_engine::check_guidance(g)
                .with_context(|| format!("{}: `guidance` = {g}", p.display()))?;
        }
        d.switch().check_domains(Some(&p))?;
        Ok(d)
    }

    /// `--stages`: the flag, else the recommendation, else `default`.
    pub fn stages(&self, flag: Option<&str>) -> Result<hybridiff_engine::stages::PlanKind> {
        Ok(flag
            .or(self.stages.as_deref())
            .unwrap_or("default")
            .parse()?)
    }

    /// `--pipelined-guidance`: the flag, else the recommendation, else `none`.
    pub fn pipelined_guidance(&self, flag: Option<&str>) -> Result<PipelinedGuidance> {
        Ok(flag
            .or(self.pipelined_guidance.as_deref())
            .unwrap_or("none")
            .parse()?)
    }

    /// The switching thresholds it recommends.
    pub fn switch(&self) -> PartialSwitch {
        PartialSwitch {
            l_slope: self.l_slope,
            eps_slope: self.eps_slope,
            k: self.k,
            tau_cap: self.tau_cap,
        }
    }
}

/// `--device` and `--devices`: where the in-process ranks compute.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda (= cuda:0), cuda:N, or auto (CUDA when this build has it and a GPU is
    /// present, else the CPU). In-process rank r runs on cuda:(N + r); ranks beyond the GPUs
    /// wrap around (several ranks share a GPU: correct, not faster).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// GPUs for the in-process ranks, comma-separated (`0,1`): rank r runs on the r-th,
    /// wrapping around when there are more ranks. Needs --device cuda or auto.
    #[arg(long)]
    pub devices: Option<String>,
}

/// Where a run's ranks compute: rank 0's device (the job's: model and inputs are loaded
/// there) and every in-process rank's.
pub struct Devices {
    pub device: candle_core::Device,
    pub placement: hybridiff_engine::device::Placement,
}

impl DeviceArgs {
    fn parsed(&self) -> Result<(hybridiff_engine::device::DeviceRequest, Option<Vec<usize>>)> {
        let request: hybridiff_engine::device::DeviceRequest = self.device.parse()?;
        let list = match &self.devices {
            Some(s) => Some(hybridiff_engine::device::parse_device_list(s)?),
            None => None,
        };
        Ok((request, list))
    }

    /// The checks that need no GPU (flag syntax, `--devices` without a GPU device, CUDA asked
    /// of a CPU-only build), to run before anything is read or loaded.
    pub fn precheck(&self) -> Result<()> {
        let (request, list) = self.parsed()?;
        hybridiff_engine::device::map_ranks(
            request,
            list.as_deref(),
            1,
            candle_core::utils::cuda_is_available(),
            // Counted for real in `resolve`; here only the flags are checked.
            || hybridiff_engine::device::MAX_GPUS,
        )?;
        Ok(())
    }

    /// The devices of `world_size` in-process ranks, or of this process's rank (`local` =
    /// (rank on this machine, processes on this machine)) when ranks are processes. Says on
    /// stderr (when `print`) what the user may not expect: auto's fallback to the CPU, GPUs
    /// shared by several ranks.
    pub fn resolve(
        &self,
        world_size: usize,
        local: Option<(usize, usize)>,
        print: bool,
    ) -> Result<Devices> {
        use hybridiff_engine::device::{map_ranks, open_devices, transfer, Placement};
        let (request, list) = self.parsed()?;
        let ranks = match local {
            Some((_, n)) => n,
            None => world_size.max(1),
        };
        let map = map_ranks(
            request,
            list.as_deref(),
            ranks,
            candle_core::utils::cuda_is_available(),
            hybridiff_engine::device::cuda_device_count,
        )?;
        if print {
            for note in &map.notes {
                eprintln!("hybridiff: {note}");
            }
        }
        if let Some((rank, _)) = local {
            // One rank per process: this process's device, all its ranks (one) on it.
            let mine = map.ranks[rank.min(map.ranks.len() - 1)];
            let device = open_devices(&[mine])?.remove(0);
            return Ok(Devices {
                device,
                placement: Placement::default(),
            });
        }
        let devices = open_devices(&map.ranks)?;
        if print && ranks > 1 && map.ranks[0] != hybridiff_engine::device::RankDevice::Cpu {
            eprintln!(
                "hybridiff: ranks on {}; tensors between ranks: {}",
                map.ranks
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                transfer(&map.ranks)
            );
        }
        Ok(Devices {
            device: devices[0].clone(),
            placement: Placement::new(map.ranks, devices)?,
        })
    }
}

/// Loads the denoiser of `model` once on every device of `placement` other than rank 0's
/// (whose copy the caller loaded), for the ranks placed there, with the same LoRAs. Nothing
/// to load when every rank shares one device (always, on CPU builds).
pub fn load_replicas(
    placement: hybridiff_engine::device::Placement,
    model: &hybridiff_engine::source::ResolvedModel,
    dtype: candle_core::DType,
) -> Result<hybridiff_engine::device::Placement> {
    let mut placement = placement;
    for (label, device) in placement.other_devices() {
        let model = hybridiff_engine::Model::load_resolved(model, dtype, &device)?;
        placement = placement.with_replica(label, model.denoiser.clone());
    }
    Ok(placement)
}

/// This process's rank on its machine and the job's processes there, from the launcher's
/// environment (Open MPI, MPICH / Intel MPI), else its rank in the job.
fn local_rank(p: crate::launch::Processes) -> (usize, usize) {
    let rank = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
        .unwrap_or(p.rank);
    (rank, p.local_size.max(rank + 1))
}

/// How a job runs: strategy, ranks, threads, precision. Shared by `denoise` and `generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// serial (1 rank); cfg (2P ranks: the CFG branches x P bands, exact); hybrid (2P ranks:
    /// cfg's exact steps, pipelined where the branches agree); async (2+ ranks, 3+ with
    /// --stride 2); patch (2P ranks, or P with --no-cfg-split). Which to pick: hybrid on 2, 4
    /// or 8 devices (the fastest at the quality of exact steps; see README, "Which strategy");
    /// cfg where every step must be exact.
    #[arg(long, default_value = "serial")]
    pub strategy: String,
    /// Number of ranks [default: 1 for serial, 2 otherwise]. Ranks are threads of this
    /// process: at most 64, and at most 4 threads per core in all.
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Compute threads per rank, at most the machine's cores [default: cores / world size].
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// f32 or f16 (bf16 on CUDA builds).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The sampler, by our name or diffusers' class name [default: the model's
    /// scheduler_config.json]. euler-a ("Euler a"), dpmpp-2m-sde and lcm add fresh noise each
    /// step, drawn from --seed by --noise (chacha8: from the seed and the step alone; torch:
    /// diffusers' generator after the latents), the same image on every strategy and rank.
    /// DPMSolverMultistepScheduler takes its algorithm (2M or 2M SDE) from the config.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(hybridiff_schedulers::SchedulerKind::names()))]
    pub scheduler: Option<String>,
    /// Karras sigmas (diffusers' use_karras_sigmas), e.g. "DPM++ 2M Karras" = --scheduler
    /// dpmpp-2m --karras; for euler, dpmpp-2m, dpmpp-2m-sde, unipc and flow-euler.
    #[arg(long)]
    pub karras: bool,
    /// diffusers' guidance_rescale (Lin et al. 2023, for v-prediction and zero-SNR models):
    /// mixes the guided prediction rescaled to the conditional one's std, 0 (off) to 1 (0.7
    /// in the paper); only with classifier-free guidance (--guidance above 1), not for SD3.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub guidance_rescale: f64,
    /// Seconds any rank waits for another before the job fails, 1 to 604800 [default: 600
    /// with ranks as threads, 60 with one rank per process].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub comm_timeout: Option<u64>,
    /// How tensors move between ranks: host (the in-process channel for ranks as threads, MPI
    /// for ranks as processes) or nccl (GPU to GPU over NCCL; one process per GPU under
    /// mpirun; needs a build with --features cuda,nccl,mpi).
    #[arg(long, default_value = "host", value_parser = ["host", "nccl"])]
    pub comm: String,
    #[command(flatten)]
    pub devices: DeviceArgs,
    #[command(flatten)]
    pub strategy_args: StrategyArgs,
}

/// Refuses a step cache that does not fit `model`, saying where a `default` one came from.
pub fn check_cache_fits(
    cache: Option<&(CacheSpec, String)>,
    model: &dyn hybridiff_models::Denoiser,
) -> Result<()> {
    if let Some((spec, note)) = cache {
        spec.skip_range(model)
            .map_err(|e| anyhow::anyhow!("{e}{}", from_default(note)))?;
    }
    Ok(())
}

/// ` (--cache default: ... from FILE)` when the cache came from a model's recommendation.
pub(crate) fn from_default(note: &str) -> String {
    if note.starts_with("--cache default") {
        format!(" ({note})")
    } else {
        String::new()
    }
}

/// `--dtype`: f32 or f16, and bf16 where the device has bf16 kernels.
pub(crate) fn parse_dtype(s: &str, device: &candle_core::Device) -> Result<candle_core::DType> {
    use candle_core::DType;
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" if device.is_cpu() => anyhow::bail!(
            "--dtype bf16: candle's CPU backend has no bf16 matmul or conv2d; use f32 or f16 on CPU (bf16 runs on CUDA builds)"
        ),
        "bf16" => Ok(DType::BF16),
        other => anyhow::bail!("--dtype: unknown dtype `{other}`; expected f32, f16 or bf16"),
    }
}

/// [`RunArgs`] checked and resolved.
pub struct Run {
    pub kind: StrategyKind,
    pub strategy: Box<dyn hybridiff_engine::Strategy>,
    pub options: hybridiff_engine::RunOptions,
    pub dtype: candle_core::DType,
    /// `--scheduler` as given (ours or a diffusers class name; see [`Run::scheduler_kind`]).
    pub scheduler: Option<String>,
    /// `--karras`.
    pub karras: bool,
    /// `--guidance-rescale`.
    pub guidance_rescale: f64,
    /// The hybrid thresholds and where they came from.
    pub switch: ResolvedSwitch,
    /// `--cache`, and the line saying where it came from.
    pub cache: Option<(CacheSpec, String)>,
    /// Rank 0's device: load the model and inputs here (`options.placement` has every
    /// rank's; [`load_replicas`] loads the model on the others).
    pub device: candle_core::Device,
    /// `--comm nccl`: ranks (processes) exchange tensors over NCCL.
    pub nccl: bool,
}

impl Run {
    /// The sampler `--scheduler` names, read against the model's scheduler config (which
    /// picks DPMSolverMultistepScheduler's algorithm); `None` without the flag (the
    /// config's `_class_name` decides, see [`hybridiff_engine::Model::scheduler`]).
    pub fn scheduler_kind(
        &self,
        cfg: &hybridiff_schedulers::SchedulerConfig,
    ) -> Result<Option<hybridiff_schedulers::SchedulerKind>> {
        self.scheduler
            .as_deref()
            .map(|name| {
                hybridiff_schedulers::SchedulerKind::resolve(name, cfg)
                    .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))
            })
            .transpose()
    }

    /// Refuses a `--cache` that does not fit the loaded `model` (before any compute), saying
    /// where a `default` one came from.
    pub fn check_cache_fits(&self, model: &dyn hybridiff_models::Denoiser) -> Result<()> {
        check_cache_fits(self.cache.as_ref(), model)
    }

    /// [`announce`] for this run's strategy, and where `--cache default` came from.
    pub fn announce(&self, guidance: f64, steps: usize, print: bool) -> Result<()> {
        if let (true, Some((_, note))) = (print, &self.cache) {
            if note.starts_with("--cache default") {
                eprintln!("hybridiff: {note}");
            }
        }
        announce(
            &[self.kind],
            &[self.strategy.as_ref()],
            &self.switch,
            guidance,
            steps,
            print,
        )
    }
}

impl RunArgs {
    /// Resolves the flags for a run of `steps` steps and sets the per-rank thread budget.
    /// `processes`: this process is one rank of a job of that many processes (one rank per
    /// process): the world size is then the number of processes (`--world-size`, if given,
    /// must agree), and the default thread budget shares this machine's cores among its
    /// processes.
    pub fn resolve(
        &self,
        defaults: &ModelDefaults,
        steps: usize,
        processes: Option<crate::launch::Processes>,
    ) -> Result<Run> {
        let kind: StrategyKind = self.strategy.parse()?;
        hybridiff_engine::check_guidance_rescale(self.guidance_rescale, None)?;
        check_flags_used(
            Given::get(),
            &[kind],
            &self.strategy_args,
            &format!("--strategy {kind}"),
        )?;
        let nccl = self.comm == "nccl";
        if nccl {
            crate::launch::check_nccl(processes)?;
        }
        let world_size = match (processes, self.world_size) {
            (Some(p), Some(w)) if w != p.size => anyhow::bail!(
                "--world-size {w}: this job was started as {} processes (one rank each); give \
                 --world-size {} or leave it out",
                p.size,
                p.size
            ),
            (Some(p), _) => p.size,
            (None, w) => w.unwrap_or(match kind {
                StrategyKind::Serial => 1,
                _ => 2,
            }),
        };
        let threads = self.threads_per_rank.unwrap_or_else(|| match processes {
            Some(p) => crate::default_threads(p.local_size),
            None => crate::default_threads(world_size),
        });
        let comm_timeout = self
            .comm_timeout
            .unwrap_or(if processes.is_some() { 60 } else { 600 });
        let mut run_options = hybridiff_engine::RunOptions {
            world_size,
            threads_per_rank: threads,
            comm_timeout: std::time::Duration::from_secs(comm_timeout),
            placement: Default::default(),
        };
        // Before any pool exists: rayon panics when it cannot create its threads. Under MPI
        // this process holds one rank; the launcher places the others.
        hybridiff_engine::RunOptions {
            world_size: if processes.is_some() { 1 } else { world_size },
            ..run_options.clone()
        }
        .check(hybridiff_engine::cores())?;
        // After the layout checks, so a bad --world-size is named before any GPU is opened.
        let print = processes.is_none_or(|p| p.rank == 0);
        let devices = self
            .devices
            .resolve(world_size, processes.map(local_rank), print)?;
        run_options.placement = devices.placement;
        crate::set_compute_threads(threads);
        let (options, switch) = self.strategy_args.options(defaults, steps)?;
        let cache = self.strategy_args.cache(defaults, steps)?;
        if let Some((spec, note)) = &cache {
            spec.check_steps(steps)
                .map_err(|e| anyhow::anyhow!("{e}{}", from_default(note)))?;
        }
        Ok(Run {
            kind,
            strategy: kind.build(&options),
            options: run_options,
            dtype: parse_dtype(&self.dtype, &devices.device)?,
            scheduler: self.scheduler.clone(),
            karras: self.karras,
            guidance_rescale: self.guidance_rescale,
            switch,
            cache,
            device: devices.device,
            nccl,
        })
    }
}

/// What goes with `--model` (generate, denoise, bench, serve): a config folder for a
/// single file, a VAE to decode with, LoRAs to merge.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// With a single-file --model whose shapes are not a standard SD 1.x / 2.x / SDXL
    /// base's: a diffusers pipeline folder whose configs and tokenizers to load it with
    /// (model_index.json, */config.json, tokenizer*/; no weights needed).
    #[arg(long, value_name = "DIR")]
    pub config: Option<std::path::PathBuf>,
    /// Decode with this VAE instead of the model's: a diffusers vae/ folder, or a
    /// .safetensors VAE in diffusers or original (encoder.down.0...) names, which takes
    /// the model's VAE config.
    #[arg(long, value_name = "FOLDER|FILE")]
    pub vae: Option<std::path::PathBuf>,
    /// A LoRA merged into the weights once, at load (no cost per step; every strategy and
    /// rank sees the same weights): FILE or FILE:SCALE (default 1). Repeatable. kohya /
    /// A1111 (lora_unet_..., lora_te1_..., lora_te2_..., with alpha) or diffusers / PEFT
    /// (lora_A/lora_B, lora.down/lora.up) naming; linear and conv (LoCon) modules of the
    /// U-Net / MMDiT and the CLIP text encoders.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
}

impl ModelArgs {
    /// The model spec for `model` with these flags (LoRA scales parsed and checked).
    pub fn spec(&self, model: &std::path::Path) -> Result<hybridiff_engine::source::ModelSpec> {
        let loras = self
            .loras
            .iter()
            .map(|l| hybridiff_models::lora::LoraSpec::parse(l))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(hybridiff_engine::source::ModelSpec {
            model: model.to_path_buf(),
            config: self.config.clone(),
            vae: self.vae.clone(),
            loras,
        })
    }

    /// The inputs these flags name, for the checks that no output overwrites an input.
    pub fn inputs(&self) -> Vec<(&'static str, std::path::PathBuf)> {
        let mut v = Vec::new();
        if let Some(c) = &self.config {
            v.push(("--config", c.clone()));
        }
        if let Some(p) = &self.vae {
            v.push(("--vae", p.clone()));
        }
        for l in &self.loras {
            if let Ok(s) = hybridiff_models::lora::LoraSpec::parse(l) {
                v.push(("--lora", s.path));
            }
        }
        v
    }
}
