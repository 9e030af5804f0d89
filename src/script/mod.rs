//! The Rhai engine: limits, the stdlib module resolver, `--set` constants, option maps,
//! static checks, and error rendering with file:line:column and the source line.

pub mod check;
pub mod options;

use anyhow::{bail, Result};
use rhai::module_resolvers::FileModuleResolver;
use rhai::{Dynamic, Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, AST};
use rhai::Shared;
type SharedModule = Shared<Module>;
use std::path::{Path, PathBuf};

/// Rhai modules shipped inside the binary, importable as `"ft/<name>"`.
pub const STDLIB: &[(&str, &str)] = &[
    ("ft/callbacks", include_str!("../../stdlib/callbacks.rhai")),
    ("ft/templates", include_str!("../../stdlib/templates.rhai")),
    ("ft/lora", include_str!("../../stdlib/lora.rhai")),
];

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
        if let Some((_, src)) = STDLIB.iter().find(|(name, _)| *name == path) {
            let mut ast = engine.compile(*src).map_err(|e| {
                Box::new(EvalAltResult::ErrorInModule(path.to_string(), e.into(), pos))
            })?;
            ast.set_source(path);
            let m = Module::eval_ast_as_new(Scope::new(), &ast, engine)
                .map_err(|e| Box::new(EvalAltResult::ErrorInModule(path.to_string(), e, pos)))?;
            return Ok(m.into());
        }
        self.files.resolve(engine, source, path, pos)
    }
}

/// A recipe: its path, source text and compiled AST.
pub struct Recipe {
    pub path: PathBuf,
    pub source: String,
    pub ast: AST,
}

/// An engine with limits, the module resolver, `print`/`debug` routed to tracing, and every
/// ftscript function registered.
pub fn new_engine(recipe_dir: &Path) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_call_levels(64);
    engine.set_max_expr_depths(128, 64);
    engine.set_max_string_size(64 << 20);
    engine.set_optimization_level(rhai::OptimizationLevel::None);
    engine.set_module_resolver(Resolver { files: FileModuleResolver::new_with_path(recipe_dir) });
    // `eval` is reserved in Rhai, but the recipe surface uses it as a name (`#{train, eval}`,
    // `data.eval`): recipes never evaluate strings as code, so it becomes a plain identifier.
    #[allow(deprecated)]
    engine.on_parse_token(|token, _, _| match token {
        rhai::Token::Reserved(s) if s.as_str() == "eval" => rhai::Token::Identifier(s),
        t => t,
    });
    engine.on_print(|s| tracing::info!(target: "recipe", "{s}"));
    engine.on_debug(|s, src, pos| {
        let at = match (src, pos.line()) {
            (Some(src), Some(l)) => format!("{src}:{l}: "),
            (None, Some(l)) => format!("line {l}: "),
            _ => String::new(),
        };
        tracing::debug!(target: "recipe", "{at}{s}")
    });
    crate::api::register(&mut engine);
    engine
}

impl Recipe {
    /// Reads and compiles a recipe; a syntax error is rendered with file:line:column.
    pub fn load(engine: &Engine, path: &Path) -> Result<Recipe> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read recipe {}: {e}", path.display()))?;
        let mut ast = match engine.compile(&source) {
            Ok(ast) => ast,
            Err(e) => bail!("{}", render_at(path, &source, &e.to_string(), e.position())),
        };
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

    /// Replaces the value of top-level constants with `--set key=value` values.
    pub fn apply_overrides(&mut self, overrides: &[(String, Dynamic)]) -> Result<()> {
        let declared = self.declared_constants();
        for (key, _) in overrides {
            if !declared.contains(key) {
                bail!(
                    "--set {key}: the recipe declares no constant `{key}`; declared: {}",
                    if declared.is_empty() { "(none)".to_string() } else { declared.join(", ") }
                );
            }
        }
        let mut stmts: Vec<rhai::Stmt> = self.ast.statements().to_vec();
        for s in stmts.iter_mut() {
            if let rhai::Stmt::Var(x, flags, _) = s {
                if flags.contains(rhai::ASTFlags::CONSTANT) {
                    if let Some((_, v)) = overrides.iter().find(|(k, _)| k.as_str() == x.0.name.as_str()) {
                        let pos = x.1.position();
                        x.1 = rhai::Expr::from_dynamic(v.clone(), pos);
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

/// Unwraps function-call and module wrappers down to the error that happened, keeping the
/// innermost position inside the recipe.
fn innermost(err: &EvalAltResult) -> (String, Position, Option<String>) {
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

/// Parses a `--set` value: a Rhai literal (number, bool, string, array, map), else a string.
pub fn parse_set_value(engine: &Engine, text: &str) -> Dynamic {
    let bare = Engine::new_raw();
    let _ = engine;
    match bare.eval_expression::<Dynamic>(text) {
        Ok(v) => v,
        Err(_) => Dynamic::from(text.to_string()),
    }
}
