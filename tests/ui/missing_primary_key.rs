use orm::Model;

#[derive(Model, Debug, Clone)]
pub struct Note {
    pub body: String,
}

fn main() {}
