"use strict";
// The P.808 rating page. Served ("server" mode), votes go to the server's /api; offline (test.html opened from
// disk), the sessions are inlined, progress stays in localStorage and the votes are downloaded as a CSV.
// A clip must play to its end before it can be rated; the page has no seek bar, so it cannot be skipped through.

const settings = JSON.parse(document.getElementById("p808-settings").textContent);
const app = document.getElementById("app");

const ACR = [[5, "Excellent"], [4, "Good"], [3, "Fair"], [2, "Poor"], [1, "Bad"]];
const LABELS = {
  acr: ACR,
  ovrl: ACR,
  sig: [[5, "Not distorted"], [4, "Slightly distorted"], [3, "Somewhat distorted"], [2, "Fairly distorted"],
        [1, "Very distorted"]],
  bak: [[5, "Not noticeable"], [4, "Slightly noticeable"], [3, "Noticeable but not intrusive"],
        [2, "Somewhat intrusive"], [1, "Very intrusive"]],
  ccr: [[3, "Much better"], [2, "Better"], [1, "Slightly better"], [0, "About the same"], [-1, "Slightly worse"],
        [-2, "Worse"], [-3, "Much worse"]],
};
const QUESTIONS = {
  acr: "How would you rate the quality of the speech sample you just heard?",
  sig: "Attending ONLY to the SPEECH SIGNAL, the speech in this sample was:",
  bak: "Attending ONLY to the BACKGROUND, the background in this sample was:",
  ovrl: "Considering the OVERALL sample (speech and background), its quality was:",
  ccr: "The quality of the SECOND sample compared to the quality of the FIRST is:",
};
const TITLES = {volume: "Set your volume", headphone: "Headphone check", training: "Training", rate: "Rate the sample"};
const INSTRUCTIONS = {
  volume: "Play the sample and set the volume of your device to a comfortable listening level. " +
          "Keep it at this level for the whole session.",
  headphone: "You will hear two digits: one in your LEFT ear only, one in your RIGHT ear only. " +
             "Wear your headphones the right way round and select both digits.",
  training: "These samples show the range of quality you will hear in this test. Rate them as you would " +
            "in the test; training votes are not counted.",
  rate: "Play the sample to its end, then rate it.",
};
const RATER_PATTERN = /^[A-Za-z0-9_.@-]{1,64}$/;
const now = () => new Date().toISOString();

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === true) node.setAttribute(name, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), {code: data.code});
  return data;
}

const served = {
  start: (rater) => post("api/start", {rater}),
  played: (rater, session, item) => post("api/played", {rater, session, item}),
  vote: (rater, session, item, votes) => post("api/vote", {rater, session, item, votes}),
};

const offline = {
  key: (rater, session) => `quell-p808:${location.pathname}:${rater}:${session}`,
  load(rater, session) {
    return JSON.parse(localStorage.getItem(this.key(rater, session)) || '{"played": {}, "rows": []}');
  },
  save(rater, session, progress) { localStorage.setItem(this.key(rater, session), JSON.stringify(progress)); },
  async start(rater, sessionId) {
    const session = settings.sessions.find((s) => s.id === sessionId);
    if (!session) throw new Error("Choose a session.");
    const progress = this.load(rater, session.id);
    return {session, answered: progress.rows.map((row) => row.item), played: Object.keys(progress.played)};
  },
  async played(rater, session, item) {
    const progress = this.load(rater, session);
    progress.played[item] = progress.played[item] || now();
    this.save(rater, session, progress);
  },
  async vote(rater, session, item, votes) {
    const progress = this.load(rater, session);
    if (!progress.played[item]) throw new Error("Play the sample to its end before rating it.");
    const votedAt = now();
    for (const [scale, vote] of Object.entries(votes)) {
      progress.rows.push({rater, session, item, scale, vote, played: 1, played_at: progress.played[item],
                          voted_at: votedAt});
    }
    this.save(rater, session, progress);
  },
  csv(rater, session) {
    const columns = ["rater", "session", "item", "scale", "vote", "played", "played_at", "voted_at"];
    const lines = this.load(rater, session).rows.map((row) => columns.map((c) => row[c]).join(","));
    return [columns.join(","), ...lines].join("\n") + "\n";
  },
};

const backend = settings.mode === "offline" ? offline : served;
let rater = "";
let state = null; // {session, answered: Set of item ids}

function showError(message) {
  const box = document.getElementById("error");
  if (box) box.textContent = message || "";
}

function showStart(message) {
  const sessionChoice = settings.mode === "offline"
    ? element("label", {}, "Session ", element("select", {id: "session"},
        ...settings.sessions.map((s) => element("option", {value: s.id}, s.id))))
    : null;
  const start = element("button", {id: "start"}, "Start");
  app.replaceChildren(
    element("h1", {}, "Listening test"),
    element("p", {}, "Please use headphones (both ears) in a quiet place, and stay until the session ends. " +
                     "You can close the page and come back later: you will continue where you stopped."),
    message ? element("p", {class: "note", id: "message"}, message) : null,
    element("label", {for: "rater"}, "Your rater ID "),
    element("input", {id: "rater", autocomplete: "off", value: localStorage.getItem("quell-p808:rater") || ""}),
    sessionChoice, element("div", {}, start), element("p", {class: "error", id: "error"}));
  start.addEventListener("click", begin);
}

async function begin() {
  const input = document.getElementById("rater");
  if (input) rater = input.value.trim();
  if (!RATER_PATTERN.test(rater)) {
    showError("Your rater ID: 1 to 64 letters, digits, '.', '_', '-' or '@'.");
    return;
  }
  localStorage.setItem("quell-p808:rater", rater);
  const choice = document.getElementById("session");
  try {
    const started = await backend.start(rater, choice ? choice.value : undefined);
    if (started.finished) {
      showStart(started.message);
      return;
    }
    state = {session: started.session, answered: new Set(started.answered)};
    next();
  } catch (error) {
    showError(error.message);
  }
}

function next() {
  const items = state.session.items;
  const index = items.findIndex((item) => !state.answered.has(item.id));
  if (index < 0) showFinished();
  else showItem(items[index], index, items.length);
}

function playToEnd(audio) {
  return new Promise((resolve, reject) => {
    audio.onended = () => resolve();
    audio.onerror = () => reject(new Error(`Cannot play ${audio.getAttribute("src")}.`));
    audio.currentTime = 0;
    audio.play().catch(reject);
  });
}

function scaleControls(scale) {
  return element("fieldset", {disabled: true, "data-scale": scale}, element("legend", {}, QUESTIONS[scale]),
    ...LABELS[scale].map(([value, label]) => element("label", {class: "choice"},
      element("input", {type: "radio", name: `vote-${scale}`, value: String(value)}), ` ${label}`)));
}

function digitControls(side) {
  const digits = [...Array(10).keys()].map((d) => element("option", {value: String(d)}, String(d)));
  return element("fieldset", {disabled: true, "data-scale": side},
    element("legend", {}, `Digit in your ${side.toUpperCase()} ear`),
    element("select", {id: side}, element("option", {value: ""}, "?"), ...digits));
}

function readVotes(item, section) {
  const votes = {};
  for (const scale of item.scales) {
    if (scale === "volume") votes.volume = 1;
    else if (scale === "left" || scale === "right") {
      const value = section.querySelector(`#${scale}`).value;
      if (value === "") return null;
      votes[scale] = Number(value);
    } else {
      const checked = section.querySelector(`input[name="vote-${scale}"]:checked`);
      if (!checked) return null;
      votes[scale] = Number(checked.value);
    }
  }
  return votes;
}

function showItem(item, index, total) {
  const audios = item.clips.map((clip) => element("audio", {src: clip, preload: "auto"}));
  const play = element("button", {id: "play"}, item.clips.length > 1 ? "Play both samples" : "Play");
  const proceed = element("button", {id: "next", disabled: true}, "Next");
  const controls = item.scales.filter((scale) => scale !== "volume")
    .map((scale) => (scale === "left" || scale === "right" ? digitControls(scale) : scaleControls(scale)));
  const section = element("section", {id: "item", "data-item": item.id, "data-kind": item.kind, "data-played": "0"},
    element("p", {class: "progress"}, `Session ${state.session.id}, step ${index + 1} of ${total}`),
    element("h1", {}, TITLES[item.kind]),
    element("p", {}, INSTRUCTIONS[item.kind]),
    item.clips.length > 1 ? element("p", {class: "note"}, "You will hear two samples, one after the other.") : null,
    ...audios, play, ...controls, proceed, element("p", {class: "error", id: "error"}));
  app.replaceChildren(section);
  const update = () => {
    proceed.disabled = section.dataset.played !== "1" || readVotes(item, section) === null;
  };
  section.addEventListener("change", update);
  play.addEventListener("click", async () => {
    play.disabled = true;
    showError("");
    try {
      for (const audio of audios) await playToEnd(audio);
      await backend.played(rater, state.session.id, item.id);
      section.dataset.played = "1";
      for (const fieldset of controls) fieldset.disabled = false;
      update();
    } catch (error) {
      showError(error.message);
    }
    play.disabled = false;
  });
  proceed.addEventListener("click", async () => {
    proceed.disabled = true;
    try {
      await backend.vote(rater, state.session.id, item.id, readVotes(item, section));
    } catch (error) {
      if (error.code !== "already-voted") {
        showError(error.message);
        update();
        return;
      }
    }
    state.answered.add(item.id);
    next();
  });
}

function showFinished() {
  const children = [element("h1", {}, "Thank you!"), element("p", {}, `Session ${state.session.id} is complete.`)];
  if (settings.mode === "offline") {
    const file = new Blob([offline.csv(rater, state.session.id)], {type: "text/csv"});
    children.push(element("p", {}, "Download your votes and send the file to the experimenter: ",
      element("a", {id: "download", href: URL.createObjectURL(file),
                    download: `votes_${rater}_${state.session.id}.csv`}, "votes")));
  } else {
    const another = element("button", {id: "another"}, "Rate another session");
    another.addEventListener("click", begin);
    children.push(another, element("p", {class: "error", id: "error"}));
  }
  app.replaceChildren(element("section", {id: "finished"}, ...children));
}

showStart();
