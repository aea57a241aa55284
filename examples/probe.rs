fn main() {
    let path = std::env::args().nth(1).unwrap();
    let t = std::time::Instant::now();
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path).unwrap());
    let opts = release::archive::CheckOptions { max_unpacked_bytes: 1 << 40, max_files: 1 << 30, shared: vec![], record_migrations: true };
    let s = release::archive::check(f, &opts).unwrap();
    println!("check {:?} {:?}", t.elapsed(), s.file_count);
    let t = std::time::Instant::now();
    let data = std::fs::read(&path).unwrap();
    println!("read {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let d = release::digest::Digest::of(&data);
    println!("sha2 {:?} {d}", t.elapsed());
}
