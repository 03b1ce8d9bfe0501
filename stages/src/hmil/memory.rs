//! How the process keeps memory that libtorch frees. libtorch takes every CPU tensor from
//! `malloc`; glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings and
//! unmaps them on free, so each training step of 64 bags (several 256 MiB activations) would
//! fault in and zero gigabytes of new pages. Keeping freed blocks in the heap removes that cost
//! (measured by `hmil-flow bench epoch`); the price is that the process keeps its peak heap.
//! Hence the other half: how many instances a training step may run at once.

use schemas::workflow::ModelKind;
use tch::Device;

/// Serves large blocks from the heap and keeps up to 2 GiB of freed memory for reuse. Process-wide;
/// call once at start-up, before tensors are allocated. Does nothing on other C libraries.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists and its failure (return 0) leaves the defaults, which are correct, only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Activations a training step holds on the CPU at most by default (1.5 GiB): past a few tens
/// of thousands of instances a bigger pass is no faster there, only larger.
const CPU_STEP_CAP: u64 = 3 << 29;

/// What a step keeps between its passes on the CPU at most (2 GiB, within a quarter of the free
/// memory): the stem and product outputs of half a million HMIL instances.
const CPU_CACHE_CAP: u64 = 1 << 31;

/// Bytes free for training on `device`: the machine's available memory for the CPU, the GPU's
/// free memory as `nvidia-smi` reports it; none where it cannot be read.
pub fn free_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(n) => gpu_free_bytes(n),
        _ => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
        }
    }
}

/// Free memory of CUDA device `n` (numbered as this process sees them, through
/// `CUDA_VISIBLE_DEVICES`).
fn gpu_free_bytes(n: usize) -> Option<u64> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let id = match visible.as_deref().map(|v| v.split(',').map(str::trim).collect::<Vec<_>>()) {
        Some(ids) if !ids.is_empty() && !ids[0].is_empty() => ids.get(n)?.to_string(),
        _ => n.to_string(),
    };
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", &id])
        .output()
        .ok()?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(mib << 20)
}

/// An upper estimate of the bytes a training step holds per instance of `dim` features: the
/// activations the backward pass keeps and, at its peak, their gradients (checked against the
/// peak RSS of `hmil-flow bench epoch`).
pub fn step_bytes_per_instance(model: ModelKind, dim: i64) -> u64 {
    let floats = match model {
        ModelKind::Hmil => 4 * dim + 5000,
        ModelKind::Abmil | ModelKind::Meanpool => 2 * dim + 4000,
        // The Nyström layers' q, k, v and outputs, twice.
        ModelKind::Transmil => 2 * dim + 16000,
    };
    floats.max(1) as u64 * 4
}

/// The instances a training step of `model` runs at once on `device`, and how that was chosen:
/// the setting, or half the free memory (at most [`CPU_STEP_CAP`] on the CPU); none when
/// neither is known.
pub fn step_budget(setting: Option<u64>, model: ModelKind, dim: i64, device: Device) -> (Option<i64>, String) {
    if let Some(n) = setting {
        return (Some(n as i64), format!("train.max_instances_per_chunk = {n}"));
    }
    let Some(free) = free_bytes(device) else {
        return (None, "free memory unknown; set train.max_instances_per_chunk to bound it".into());
    };
    let mut usable = free / 2;
    if device == Device::Cpu {
        usable = usable.min(CPU_STEP_CAP);
    }
    let per = step_bytes_per_instance(model, dim);
    let n = (usable / per).max(1) as i64;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    (Some(n), format!("{n} instances ≈ {:.1} GiB of {:.1} GiB free", gib(n as u64 * per), gib(free)))
}

/// What a step over chunks of `budget` instances may keep between its two passes (see
/// [`models::chunked::Cache`]): on a GPU, as much as one chunk's activations take. On the CPU,
/// where a chunk past a few tens of thousands of instances is no faster, an eighth of that at
/// full chunks (a step of 64 bags of about 1,000 instances keeps everything it runs twice);
/// larger steps run smaller chunks to keep theirs, and the largest keep all they run twice,
/// up to [`CPU_CACHE_CAP`].
pub fn cache(
    model: &dyn models::MilModel,
    kind: ModelKind,
    budget: i64,
    dim: i64,
    device: Device,
) -> models::chunked::Cache {
    let per = step_bytes_per_instance(kind, dim) as i64;
    let chunk = budget.saturating_mul(per);
    let base = models::chunked::Cache::of(model, chunk);
    match (device, free_bytes(device)) {
        (Device::Cpu, Some(free)) => models::chunked::Cache {
            bytes: chunk / 8,
            activation: per,
            most: (free / 4).min(CPU_CACHE_CAP) as i64,
            ..base
        },
        _ => base,
    }
}
