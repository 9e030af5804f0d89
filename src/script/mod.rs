//! The Rhai engine: limits, the stdlib module resolver, `--set` constants, option maps,
//! static checks, and error rendering with file:line:column and the source line.

pub mod check;
pub mod limits;
pub mod options;
pub mod sandbox;

use anyhow::{bail, Result};
use rhai::module_resolvers::FileModuleResolver;
use rhai::{Dynamic, Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, AST};
use rhai::Shared;
type SharedModule = Shared<Module>;
use std::path::{Path, PathBuf};

/// Rhai modules shipped inside the binary as Rhai source, importable as `"ft/<name>"`.
pub const STDLIB: &[(&str, &str)] = &[
    ("ft/templates", include_str!("../../stdlib/templates.rhai")),
    ("ft/lora", include_str!("../../stdlib/lora.rhai")),
];

/// Modules of the stdlib written in Rust, importable as `"ft/<name>"` like [`STDLIB`]'s.
pub fn native_modules() -> Vec<(&'static str, Module)> {
    vec![("ft/callbacks", crate::api::callbacks::module())]
}

/// Resolves `ft/...` to the embedded stdlib first, then files next to the recipe.
struct Resolver {
    files: FileModuleResolver,
}

impl ModuleResolver for Resolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        if let Some((_, m)) = native_modules().into_iter().find(|(name, _)| *name == path) {
            return Ok(m.into());
        }
        if let Some((_, src)) = STDLIB.iter().find(|(name, _)| *name == path) {
            let mut ast = engine.compile(*src).map_err(|e| {
                Box::new(EvalAltResult::ErrorInModule(path.to_string(), e.into(), pos))
            })?;
            ast.set_source(path);
            let m = Module::eval_ast_as_new(Scope::new(), &ast, engine)
                .map_err(|e| Box::new(EvalAltResult::ErrorInModule(path.to_string(), e, pos)))?;
            return Ok(m.into());
        }
        let file = self.files.get_file_path(path, None);
        sandbox::check_read(&file).map_err(|e| Box::new(EvalAltResult::ErrorInModule(path.to_string(), format!("import \"{path}\": {e:#}").into(), pos)))?;
        self.files.resolve(engine, source, path, pos)
    }
}

/// A recipe: its path, source text and compiled AST.
pub struct Recipe {
    pub path: PathBuf,
    pub source: String,
    pub ast: AST,
}

/// An engine with limits, the module resolver, `print` to stdout and `debug` to tracing, and every
/// ftscript function registered.
pub fn new_engine(recipe_dir: &Path) -> Engine {
    let mut engine = Engine::new();
    engine.on_progress(limits::on_progress);
    limits::apply(&mut engine);
    engine.set_max_expr_depths(128, 64);
    engine.set_optimization_level(rhai::OptimizationLevel::None);
    engine.set_module_resolver(Resolver { files: FileModuleResolver::new_with_path(recipe_dir) });
    // `eval` is reserved in Rhai, but the recipe surface uses it as a name (`#{train, eval}`,
    // `data.eval`): recipes never evaluate strings as code, so it becomes a plain identifier.
    #[allow(deprecated)]
    engine.on_parse_token(|token, _, _| match token {
        rhai::Token::Reserved(s) if s.as_str() == "eval" => rhai::Token::Identifier(s),
        t => t,
    });
    // the recipe's own text goes to stdout as written (logs go to stderr); in a data-parallel run,
    // rank 0's only
    engine.on_print(|s| {
        if crate::dist::is_main_process() {
            println!("{s}");
        }
    });
    engine.on_debug(|s, src, pos| {
        let at = match (src, pos.line()) {
            (Some(src), Some(l)) => format!("{src}:{l}: "),
            (None, Some(l)) => format!("line {l}: "),
            _ => String::new(),
        };
        tracing::debug!(target: "recipe", "{at}{s}")
    });
    // reading a key that a map does not hold is an error (as in Python), not a silent `()`: a
    // typo in a metric name (`m.eval_los`) would otherwise compare as unit forever
    engine.set_fail_on_invalid_map_property(true);
    crate::api::register(&mut engine);
    engine
}

impl Recipe {
    /// Reads and compiles a recipe; a syntax error is rendered with file:line:column.
    pub fn load(engine: &Engine, path: &Path) -> Result<Recipe> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read recipe {}: {e}", path.display()))?;
        let ast = match engine.compile(&source) {
            Ok(ast) => ast,
            Err(e) => bail!("{}", render_at(path, &source, &e.to_string(), e.position())),
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut ast = with_module_functions(engine, ast, dir)?;
        ast.set_source(path.display().to_string());
        Ok(Recipe { path: path.to_path_buf(), source, ast })
    }

    /// Names of the top-level `const` declarations, which `--set` may override.
    pub fn declared_constants(&self) -> Vec<String> {
        self.ast
            .statements()
            .iter()
            .filter_map(|s| match s {
                rhai::Stmt::Var(x, flags, _) if flags.contains(rhai::ASTFlags::CONSTANT) => Some(x.0.name.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Replaces the value of top-level constants with `--set key=value` values. A value must have
    /// the type of the constant's literal in the recipe (an integer also serves a float, and any
    /// value a string); a constant set by an expression takes any value.
    pub fn apply_overrides(&mut self, overrides: &[(String, Dynamic)]) -> Result<()> {
        let declared = self.declared_constants();
        for (key, _) in overrides {
            if !declared.contains(key) {
                let hint = options::did_you_mean(key, declared.iter().map(String::as_str)).map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_default();
                bail!(
                    "--set {key}: the recipe declares no constant `{key}`{hint}; declared: {}",
                    if declared.is_empty() { "(none)".to_string() } else { declared.join(", ") }
                );
            }
        }
        let mut stmts: Vec<rhai::Stmt> = self.ast.statements().to_vec();
        for s in stmts.iter_mut() {
            if let rhai::Stmt::Var(x, flags, _) = s {
                if flags.contains(rhai::ASTFlags::CONSTANT) {
                    if let Some((key, v)) = overrides.iter().find(|(k, _)| k.as_str() == x.0.name.as_str()) {
                        let pos = x.1.position();
                        let value = match x.1.get_literal_value(None) {
                            Some(old) => typed_like(key, v, &old).map_err(|e| anyhow::anyhow!("{}", render_at(&self.path, &self.source, &e, pos)))?,
                            None => v.clone(),
                        };
                        x.1 = rhai::Expr::from_dynamic(value, pos);
                    }
                }
            }
        }
        let mut ast = AST::new(stmts, self.ast.shared_lib().clone());
        ast.set_source(self.path.display().to_string());
        self.ast = ast;
        Ok(())
    }

    /// Runs the recipe; errors are rendered against the recipe's source.
    pub fn run(&self, engine: &Engine) -> Result<()> {
        let mut scope = Scope::new();
        engine.run_ast_with_scope(&mut scope, &self.ast).map_err(|e| anyhow::anyhow!("{}", self.render(&e)))
    }

    /// `file:line:col: message` plus the source line and a caret.
    pub fn render(&self, err: &EvalAltResult) -> String {
        let (msg, pos, src) = innermost(err);
        match src {
            Some(s) if s != self.path.display().to_string() => {
                // the error sits in an imported module: name it, and show where the recipe called in
                let outer = err.position();
                let head = format!("{msg} (in {s}{})", pos.line().map(|l| format!(":{l}")).unwrap_or_default());
                render_at(&self.path, &self.source, &head, outer)
            }
            _ => render_at(&self.path, &self.source, &msg, pos),
        }
    }
}

/// The recipe's AST with the functions of every module it imports (transitively) merged under its
/// own. Rhai looks a closure returned by a module function up by name in the caller's library,
/// where it is missing (`Function not found: anon$…`); with the modules' functions, closures
/// included, in the recipe's library, such closures can be called from the recipe and as
/// callbacks. The recipe's functions win over a module's of the same name and arity. A module
/// that does not compile is reported at its file:line:column.
fn with_module_functions(engine: &Engine, ast: AST, dir: &Path) -> Result<AST> {
    let mut seen: Vec<String> = vec![];
    let mut todo = imports_of(&ast);
    let mut lib = AST::empty();
    while let Some(name) = todo.pop() {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        let (label, source) = match STDLIB.iter().find(|(n, _)| *n == name) {
            Some((_, src)) => (name.clone(), src.to_string()),
            None => {
                let file = dir.join(&name).with_extension("rhai");
                if sandbox::check_read(&file).is_err() {
                    continue; // the import itself reports the refusal, at its line
                }
                match std::fs::read_to_string(&file) {
                    Ok(text) => (file.display().to_string(), text),
                    Err(_) => continue, // the import itself reports a missing module, at its line
                }
            }
        };
        let module = match engine.compile(&source) {
            Ok(m) => m,
            Err(e) => bail!("{}", render_at(Path::new(&label), &source, &format!("in module `{name}`: {}", e.err_type()), e.position())),
        };
        todo.extend(imports_of(&module));
        lib = module.clone_functions_only().merge(&lib);
    }
    Ok(lib.merge(&ast))
}

/// The module paths of an AST's `import "..."` statements that are string literals.
fn imports_of(ast: &AST) -> Vec<String> {
    let mut found = vec![];
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Stmt(rhai::Stmt::Import(x, _))) = nodes.last() {
            if let rhai::Expr::StringConstant(s, _) = &x.0 {
                found.push(s.to_string());
            }
        }
        true
    });
    found
}

/// Unwraps function-call and module wrappers down to the error that happened, keeping the
/// innermost position inside the recipe.
pub(crate) fn innermost(err: &EvalAltResult) -> (String, Position, Option<String>) {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, src, inner, pos) => {
            let (m, p, s) = innermost(inner);
            if p.is_none() {
                (m, *pos, if src.is_empty() { None } else { Some(src.clone()) })
            } else {
                (m, p, s.or(if src.is_empty() { None } else { Some(src.clone()) }))
            }
        }
        EvalAltResult::ErrorInModule(name, inner, pos) => {
            let (m, _, _) = innermost(inner);
            (format!("in module `{name}`: {m}"), *pos, None)
        }
        EvalAltResult::ErrorRuntime(v, pos) => (v.to_string(), *pos, None),
        EvalAltResult::ErrorTerminated(reason, pos) => (reason.to_string(), *pos, None),
        EvalAltResult::ErrorDataRace(what, pos) => (
            format!("data race on {what}: a closure given to this call uses the variable the call is made on, which the call holds; use the value the closure receives instead (`m.with_adapters_disabled(|base| base.loss(text))`)"),
            *pos,
            None,
        ),
        EvalAltResult::ErrorStackOverflow(pos) | EvalAltResult::ErrorDataTooLarge(_, pos) => (limits::explain(err).unwrap_or_default(), *pos, None),
        EvalAltResult::ErrorPropertyNotFound(key, pos) => {
            (format!("the map has no key `{key}`; to read a key that may be missing, test `\"{key}\" in map` first"), *pos, None)
        }
        other => {
            let mut s = other.to_string();
            // Rhai appends " (line l, position c)"; we print the position ourselves.
            if let Some(i) = s.rfind(" (line ") {
                s.truncate(i);
            }
            (s, other.position(), None)
        }
    }
}

/// `err` with `prefix: ` before the message of the error that happened (the innermost one), all
/// positions kept, so it still renders at the line that failed.
pub fn prefix_error(err: Box<EvalAltResult>, prefix: &str) -> Box<EvalAltResult> {
    Box::new(match *err {
        EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => EvalAltResult::ErrorInFunctionCall(name, src, prefix_error(inner, prefix), pos),
        EvalAltResult::ErrorInModule(name, inner, pos) => EvalAltResult::ErrorInModule(name, prefix_error(inner, prefix), pos),
        EvalAltResult::ErrorRuntime(v, pos) => EvalAltResult::ErrorRuntime(format!("{prefix}: {v}").into(), pos),
        other => {
            let (msg, pos, _) = innermost(&other);
            EvalAltResult::ErrorRuntime(format!("{prefix}: {msg}").into(), pos)
        }
    })
}

/// Renders `path:line:col: msg` with the offending source line under it.
pub fn render_at(path: &Path, source: &str, msg: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(line), col) => {
            let col = col.unwrap_or(1);
            let text = source.lines().nth(line - 1).unwrap_or("");
            let gutter = format!("{line}");
            format!(
                "{}:{line}:{col}: {msg}\n {gutter} | {text}\n {} | {}^",
                path.display(),
                " ".repeat(gutter.len()),
                " ".repeat(col.saturating_sub(1))
            )
        }
        _ => format!("{}: {msg}", path.display()),
    }
}

/// `value` (from `--set key=...`) as the type of `declared`, the constant's literal in the recipe.
fn typed_like(key: &str, value: &Dynamic, declared: &Dynamic) -> std::result::Result<Dynamic, String> {
    let kind = |d: &Dynamic| match d.type_name() {
        "i64" => "an integer",
        "f64" => "a number",
        "bool" => "true or false",
        "string" | "ImmutableString" => "a string",
        "array" => "an array",
        "map" => "a map",
        other => if other.contains("String") { "a string" } else { "a value" },
    };
    let shown = if value.is_string() { format!("\"{value}\"") } else { value.to_string() };
    let converted = match (kind(declared), kind(value)) {
        (want, got) if want == got => Some(value.clone()),
        ("a number", "an integer") => value.as_int().ok().map(|i| Dynamic::from(i as f64)),
        ("a string", _) => Some(Dynamic::from(value.to_string())),
        ("a value", _) => Some(value.clone()),
        _ => None,
    };
    converted.ok_or_else(|| format!("--set {key}={shown}: `{key}` is {} in the recipe (here {declared}), not {}", kind(declared), kind(value)))
}

/// Parses a `--set` value: a Rhai literal (number, bool, string, array, map), else a string.
pub fn parse_set_value(text: &str) -> Dynamic {
    match Engine::new_raw().eval_expression::<Dynamic>(text) {
        Ok(v) => v,
        Err(_) => Dynamic::from(text.to_string()),
    }
}

/// The engine with the native stdlib modules registered as static modules under their import
/// paths, for listing and definitions only (recipes reach them through `import`).
pub fn listing_engine() -> Engine {
    let mut engine = new_engine(Path::new("."));
    for (name, m) in native_modules() {
        engine.register_static_module(name, m.into());
    }
    engine
}

/// Writes Rhai definition files (`.d.rhai`) for editors with Rhai support into `dir`: the
/// recipe functions with their doc comments and parameter types (Rhai's own definitions of the
/// engine, `__static__.d.rhai`), and each stdlib module (`ft/lora.d.rhai`, ...) with its
/// functions' doc comments. Returns how many files were written.
pub fn write_definitions(dir: &Path) -> Result<usize> {
    let engine = listing_engine();
    let mut files: Vec<(String, String)> = engine.definitions().with_headers(true).include_standard_packages(false).iter_files().collect();
    for (name, source) in STDLIB {
        let ast = engine.compile(*source).map_err(|e| anyhow::anyhow!("stdlib {name}: {e}"))?;
        let mut text = format!("module {name};\n");
        for f in ast.iter_functions() {
            text.push('\n');
            for line in f.comments.iter() {
                text.push_str(&format!("{line}\n"));
            }
            let params: Vec<String> = f.params.iter().map(|p| format!("{p}: ?")).collect();
            text.push_str(&format!("fn {}({}) -> ?;\n", f.name, params.join(", ")));
        }
        files.push((format!("{name}.d.rhai"), text));
    }
    for (file, text) in &files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
        }
        crate::nn::weights::write_atomic(&path, text.as_bytes())?;
    }
    Ok(files.len())
}
