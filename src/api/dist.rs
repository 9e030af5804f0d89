//! `rank()`, `world_size()`, `is_main_process()`: where this process stands in a data-parallel
//! run (`ftscript launch` or torchrun); 0, 1 and true for a single process.

use rhai::{Engine, FuncRegistration};

pub fn register(engine: &mut Engine) {
    FuncRegistration::new("rank")
        .with_comments(["/// This process's rank among all training processes (0 for a single process)."])
        .with_params_info(["i64"])
        .register_into_engine(engine, || crate::dist::rank() as i64);
    FuncRegistration::new("world_size")
        .with_comments(["/// How many training processes there are (1 for a single process)."])
        .with_params_info(["i64"])
        .register_into_engine(engine, || crate::dist::world_size() as i64);
    FuncRegistration::new("is_main_process")
        .with_comments(["/// True on rank 0, where logs, checkpoints and Hub pushes happen; guard your own saving and printing with it."])
        .with_params_info(["bool"])
        .register_into_engine(engine, crate::dist::is_main_process);
}
