//! The resource limiter of one plugin instance.

use wasmtime::{ResourceLimiter, Result, StoreLimits, StoreLimitsBuilder};

/// Maximum number of core instances and of tables in one component
/// instance, and of elements in one table.
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// wasmtime's [`StoreLimits`] with a memory limit, plus a record of whether
/// it denied a memory growth. An allocator that is denied memory usually
/// aborts, which is a plain `unreachable` trap, so without this record a
/// dead letter could not say that the memory limit caused it.
pub struct InstanceLimiter {
    limits: StoreLimits,
    memory_limit_mib: u64,
    memory_limit_bytes: usize,
    memory_denied: bool,
}

impl InstanceLimiter {
    /// Limits each linear memory of the instance to `memory_mib` MiB.
    // NOTE: the limit applies to each linear memory, not to their sum. A
    // component with several core modules can have several memories.
    pub fn new(memory_mib: u64) -> Self {
        let memory_limit_bytes =
            usize::try_from(memory_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
        let limits = StoreLimitsBuilder::new()
            .memory_size(memory_limit_bytes)
            .instances(MAX_INSTANCES)
            .tables(MAX_TABLES)
            .table_elements(MAX_TABLE_ELEMENTS)
            .build();
        Self {
            limits,
            memory_limit_mib: memory_mib,
            memory_limit_bytes,
            memory_denied: false,
        }
    }

    pub fn memory_limit_mib(&self) -> u64 {
        self.memory_limit_mib
    }

    /// Returns whether a memory growth was denied since the last call, and
    /// clears the record.
    pub fn take_memory_denied(&mut self) -> bool {
        std::mem::take(&mut self.memory_denied)
    }
}

impl ResourceLimiter for InstanceLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        if desired > self.memory_limit_bytes {
            self.memory_denied = true;
        }
        self.limits.memory_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn growth_within_limit_is_allowed() {
        let mut limiter = InstanceLimiter::new(16);

        assert!(limiter.memory_growing(MIB, 16 * MIB, None).unwrap());
        assert!(!limiter.take_memory_denied());
    }

    #[test]
    fn growth_beyond_limit_is_denied_and_recorded() {
        let mut limiter = InstanceLimiter::new(16);

        assert!(!limiter.memory_growing(16 * MIB, 17 * MIB, None).unwrap());
        assert!(limiter.take_memory_denied());
        assert!(!limiter.take_memory_denied(), "taking the record clears it");
    }

    #[test]
    fn declared_maximum_is_not_recorded() {
        let mut limiter = InstanceLimiter::new(16);

        assert!(!limiter.memory_growing(MIB, 2 * MIB, Some(MIB)).unwrap());
        assert!(!limiter.take_memory_denied());
    }
}
