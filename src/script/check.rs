//! `ftscript check`: compile, resolve every import, and validate every option map literal
//! passed to an ftscript function, without loading weights or running anything.

use super::Recipe;
use rhai::{ASTNode, Engine, Expr, Scope};

/// Problems found in the recipe, each rendered with file:line:column and the source line.
pub fn check(engine: &Engine, recipe: &Recipe) -> Vec<String> {
    let mut problems = vec![];
    if let Err(e) = engine.compile_into_self_contained(&Scope::new(), &recipe.source) {
        // a module that cannot be resolved is reported without a position: use its import's
        let (text, mut pos, _) = super::innermost(&e);
        let missing = ["Module not found: ", "Undefined module: "].iter().find_map(|p| text.split(p).nth(1)).map(|n| n.split(" (").next().unwrap_or(n).to_string());
        if let Some(name) = missing {
            recipe.ast.walk(&mut |nodes: &[ASTNode]| {
                if let Some(ASTNode::Stmt(rhai::Stmt::Import(x, _))) = nodes.last() {
                    if matches!(&x.0, Expr::StringConstant(s, _) if s.as_str() == name.as_str()) {
                        pos = x.0.position();
                    }
                }
                true
            });
        }
        problems.push(super::render_at(&recipe.path, &recipe.source, &format!("import: {text}"), pos));
    }
    recipe.ast.walk(&mut |nodes: &[ASTNode]| {
        let call = match nodes.last() {
            Some(ASTNode::Expr(Expr::FnCall(f, pos))) | Some(ASTNode::Expr(Expr::MethodCall(f, pos))) => Some((f, *pos)),
            _ => None,
        };
        if let Some((f, pos)) = call {
            if let Some(validate) = crate::api::option_validator(f.name.as_str()) {
                for arg in f.args.iter() {
                    if let Expr::Map(m, map_pos) = arg {
                        let (json, all_constant) = literal_map(&m.0);
                        if let Err(e) = validate(&json) {
                            // Values we cannot know statically stand in as null: only report
                            // what is certain (unknown keys; type errors of constant maps).
                            // (a size is read only from a constant: an unknown one stands in as null, which passes)
                            let certain = e.contains("unknown field") || e.contains("is not one of") || e.contains("applies to objective") || e.starts_with("memory_budget") || (all_constant && !e.contains("missing field"));
                            if certain {
                                let at = if map_pos.is_none() { pos } else { *map_pos };
                                problems.push(super::render_at(&recipe.path, &recipe.source, &format!("{}: {e}", f.name), at));
                            }
                        }
                    }
                }
            }
        }
        true
    });
    problems
}

/// The map's constant entries as JSON (others as null), and whether all were constant.
fn literal_map(entries: &[(rhai::Ident, Expr)]) -> (serde_json::Value, bool) {
    let mut all = true;
    let mut obj = serde_json::Map::new();
    for (k, v) in entries {
        let value = match v.get_literal_value(None) {
            // a function literal (a closure as `format` or a callback) stands for its result
            Some(d) if d.is_fnptr() => {
                all = false;
                serde_json::Value::Null
            }
            Some(d) => super::options::to_json(&d),
            None => {
                all = false;
                serde_json::Value::Null
            }
        };
        obj.insert(k.name.to_string(), value);
    }
    (serde_json::Value::Object(obj), all)
}
