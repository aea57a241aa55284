#!/usr/bin/env python3
"""A Laravel-like tree (~10,000 files, ~50 MB): vendor/ PHP sources in 320 packages, app/, config/,
database/, resources/, routes/, tests/, and public/ with built assets (text) and incompressible
images. Deterministic (fixed seed). Usage: bench/gen/laravel.py DIR"""
import os, random, sys
root = sys.argv[1]
rng = random.Random(20261101)
vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12))) for _ in range(4000)]
kw = ["function", "return", "public", "private", "static", "$this->", "namespace", "use", "class", "array(", "=>", "if (", "foreach (", "new", "null", "true", "false", "throw", "self::"]
def php(n_words, ns):
    body = rng.choices(vocab + kw * 40, k=n_words)
    lines = [" ".join(body[i:i + 12]) + ";" for i in range(0, len(body), 12)]
    return f"<?php\n\nnamespace {ns};\n\n" + "\n    ".join(lines) + "\n"
def write(path, data):
    p = os.path.join(root, path)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
# vendor/: ~9,400 PHP sources in 320 packages
for i in range(9400):
    vendor, pkg = f"vendor{i % 60}", f"pkg{i % 320}"
    sub = ["src", "src/Contracts", "src/Support", "src/Console", "src/Http/Middleware"][i % 5]
    write(f"vendor/{vendor}/{pkg}/{sub}/C{i}.php", php(int(rng.lognormvariate(6.3, 0.8)) + 40, f"V{i % 60}\\P{i % 320}"))
for p in range(320):
    write(f"vendor/vendor{p % 60}/pkg{p}/composer.json", '{"name": "vendor%d/pkg%d", "type": "library"}\n' % (p % 60, p))
write("vendor/autoload.php", "<?php\nrequire __DIR__ . '/composer/autoload_real.php';\n")
write("vendor/composer/autoload_real.php", php(3000, "Composer\\Autoload"))
# app/, config/, database/, resources/, routes/, tests/, bootstrap/
for i in range(150):
    sub = ["Http/Controllers", "Models", "Providers", "Jobs", "Services", "Console/Commands"][i % 6]
    write(f"app/{sub}/Class{i}.php", php(rng.randint(100, 900), "App\\" + sub.replace("/", "\\")))
for name in ["app", "auth", "broadcasting", "cache", "cors", "database", "filesystems", "hashing", "logging",
             "mail", "queue", "sanctum", "services", "session", "view", "octane"]:
    write(f"config/{name}.php", php(rng.randint(150, 600), "Config"))
for i in range(40):
    write(f"database/migrations/2024_01_{i:02d}_000000_create_table_{i}.php", php(rng.randint(80, 300), "Database"))
for i in range(120):
    write(f"resources/views/page{i // 10}/view{i}.blade.php", "<div>\n" + " ".join(rng.choices(vocab, k=rng.randint(100, 700))) + "\n</div>\n")
for name in ["auth", "pagination", "passwords", "validation"]:
    write(f"resources/lang/en/{name}.php", php(400, "Lang"))
for name in ["web", "api", "console", "channels"]:
    write(f"routes/{name}.php", php(200, "Routes"))
for i in range(60):
    write(f"tests/Feature/Test{i}.php", php(rng.randint(100, 400), "Tests\\Feature"))
write("bootstrap/app.php", php(200, "Bootstrap"))
write("bootstrap/cache/.gitignore", "*\n!.gitignore\n")
write("artisan", "#!/usr/bin/env php\n<?php\nrequire __DIR__.'/vendor/autoload.php';\n")
os.chmod(os.path.join(root, "artisan"), 0o755)
write("composer.json", '{"name": "acme/app", "require": {"php": "^8.2", "laravel/framework": "^10.0"}}\n')
write("composer.lock", php(20000, "Lock"))
write("package.json", '{"private": true, "scripts": {"build": "vite build"}}\n')
# public/: index, built assets (text), images and fonts (incompressible)
write("public/index.php", "<?php\nrequire __DIR__.'/../vendor/autoload.php';\n")
write("public/.htaccess", "RewriteEngine On\nRewriteRule ^ index.php [L]\n")
write("public/robots.txt", "User-agent: *\n")
for i in range(40):
    write(f"public/build/assets/chunk{i}.js", " ".join(rng.choices(vocab + kw, k=rng.randint(5000, 25000))) + "\n")
for i in range(64):
    ext = ["png", "jpg", "woff2", "webp"][i % 4]
    write(f"public/images/asset{i}.{ext}", rng.randbytes(rng.randint(200_000, 1_150_000)))
