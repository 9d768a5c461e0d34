#!/usr/bin/env python3
"""Deterministic generator for the bundled Persona-Chat-style sample.

Every row is invented from the hand-written pools below; nothing is taken from
Persona-Chat or any other dataset. Same seed -> byte-identical JSONL and Parquet.

    /path/to/python data/samples/make_sample.py

Writes persona_chat_sample.jsonl and persona_chat_sample.parquet next to this
script, then reads the Parquet file back and checks it equals the JSONL rows.
Needs pyarrow.
"""

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEED = 20240611
N_ROWS = 200
OUT_DIR = Path(__file__).resolve().parent
JSONL_PATH = OUT_DIR / "persona_chat_sample.jsonl"
PARQUET_PATH = OUT_DIR / "persona_chat_sample.parquet"

# How many rows have each dialogue length (odd lengths end with the other
# speaker, so the reference answers them; even lengths end with persona b and
# the reference is b's follow-up message).
LENGTH_COUNTS = {1: 27, 2: 17, 3: 27, 4: 17, 5: 27, 6: 16, 7: 27, 8: 16, 9: 26}
assert sum(LENGTH_COUNTS.values()) == N_ROWS


# ---------------------------------------------------------------------------
# persona facts of speaker b: category -> list of
#   (fact, [ways b says it when asked about the category], doing-phrase or None,
#    custom reactions of the other speaker or None)
# ---------------------------------------------------------------------------
FACTS = {
    "job": [
        ("i work as a nurse.", ["i work as a nurse, mostly night shifts at the hospital", "i am a nurse, so my schedule is all over the place"], "i just got off a long shift at the hospital", None),
        ("i am a high school chemistry teacher.", ["i teach chemistry at a high school, so there is always grading to do", "i teach high school chemistry, the kids keep me on my toes"], "i am grading lab reports, the usual", None),
        ("i drive a delivery truck.", ["i drive a delivery truck, so i am on the road all day", "i deliver packages, i drive a big truck around town"], "i just parked the delivery truck for the night", None),
        ("i am a software developer.", ["i am a software developer, i stare at a screen all day", "i write software for a small company, mostly from home"], "i am fixing a bug that has bothered me all week", None),
        ("i own a small bakery.", ["i own a little bakery, so i am up at four most mornings", "i run a small bakery, bread and pastries mostly"], "i am prepping dough for tomorrow morning", None),
        ("i work at a bookstore.", ["i work at a used bookstore, which is basically my dream job", "i sell books at a little shop downtown"], "i just closed up the bookstore", None),
        ("i am a mechanic.", ["i am a mechanic, i fix cars all day", "i work at a garage fixing cars, my hands are always greasy"], "i am scrubbing engine grease off my hands", None),
        ("i am a firefighter.", ["i am a firefighter, so some days are quiet and some are crazy", "i work at the fire station, twenty four hour shifts"], "i am at the fire station, it is a quiet night so far", None),
        ("i am retired.", ["i am retired now, after thirty years as a mail carrier", "nothing anymore, i retired last year and i love it"], "i am sitting on the porch, enjoying being retired", None),
    ],
    "pets": [
        ("i have two dogs.", ["i have two dogs, so my weekends are mostly long walks", "yes, two dogs, both rescues and both very goofy"], "i just got back from walking my two dogs", None),
        ("i have a cat named mittens.", ["i have a cat named mittens, she runs the house", "just my cat mittens, she is very spoiled"], "i am trying to get my cat mittens off my keyboard", None),
        ("i have a parrot that can say hello.", ["i have a parrot, he says hello to everyone who walks in", "yes, a parrot, he can say hello and nothing else"], None, None),
        ("i keep three chickens in my backyard.", ["i keep three chickens in the backyard, so i never buy eggs", "i have three chickens, they each have a name"], "i just collected eggs from my chickens", None),
        ("i am allergic to cats.", ["i am allergic to cats, so no pets for me", "not really, i am allergic to cats, so that rules a lot out"], None, ["oh no, that must be hard.", "ha, i understand, that is rough."]),
        ("i foster rescue puppies.", ["i foster rescue puppies until they find homes", "right now i have two foster puppies, i foster for a shelter"], "i am cleaning up after my foster puppies", None),
        ("i have a horse named biscuit.", ["i have a horse named biscuit, i ride him every weekend", "yes, a horse, his name is biscuit and he is very stubborn"], "i just got back from the barn, brushing my horse biscuit", None),
    ],
    "hobby": [
        ("i like to knit.", ["i like to knit, i make scarves for everyone i know", "mostly knitting, i am working on a blanket right now"], "i am knitting a scarf in front of the tv", None),
        ("i love hiking on weekends.", ["i love hiking, i am on a trail most weekends", "i go hiking every weekend when the weather is good"], "i just got home from a long hike", None),
        ("i collect old postcards.", ["i collect old postcards, i have over five hundred", "i collect postcards from flea markets, some are a hundred years old"], "i am sorting my postcard collection", None),
        ("i paint landscapes in my free time.", ["i paint landscapes, mostly mountains and lakes", "i like to paint, watercolor landscapes mostly"], "i am finishing a painting of the lake", None),
        ("i play video games every night.", ["i play video games, pretty much every night", "honestly, video games, i play a few hours every night"], "i am about to start a new video game", None),
        ("i like to garden.", ["i garden, tomatoes and peppers mostly", "i spend a lot of time in my garden, it relaxes me"], "i was out in the garden pulling weeds", None),
        ("i do woodworking in my garage.", ["i do woodworking in my garage, right now i am building a table", "i build furniture in my garage, it is my happy place"], "i am sanding a bookshelf in my garage", None),
        ("i am learning to play chess.", ["i am learning chess, i play online every day", "lately chess, i am still pretty bad but i love it"], "i am losing at online chess, as usual", None),
    ],
    "food": [
        ("i am a vegetarian.", ["i am a vegetarian, so i eat a lot of veggies", "i do not eat meat, but i love a good curry"], None, None),
        ("my favorite food is pizza.", ["i love pizza more than anything, especially with olives", "pizza, always pizza, i could eat it every day"], "i am waiting for a pizza delivery", None),
        ("i love spicy food.", ["i love spicy food, the hotter the better", "anything spicy, i put hot sauce on everything"], None, None),
        ("i do not like mushrooms.", ["i like most things, but i can not stand mushrooms", "pretty much anything except mushrooms, they are gross"], None, ["ha, fair enough, they are not for everyone.", "oh, i understand, the texture is weird."]),
        ("i eat tacos every tuesday.", ["i eat tacos every tuesday, it is a tradition", "tacos, i have them every tuesday without fail"], "i am making tacos, it is my weekly tradition", None),
        ("i drink way too much coffee.", ["honestly i mostly live on coffee, i drink way too much of it", "coffee counts as food, right? i drink way too much"], "i am on my fourth cup of coffee", None),
        ("i love to cook italian food.", ["i love cooking italian food, my lasagna is famous", "italian, i make fresh pasta on sundays"], "i am making a big pot of pasta sauce", None),
    ],
    "family": [
        ("i have three older brothers.", ["i have three older brothers, so i grew up tough", "i am the youngest, i have three older brothers"], None, None),
        ("i am an only child.", ["i am an only child, so it was always just me and my parents", "not big at all, i am an only child"], None, None),
        ("i have two kids.", ["i have two kids, a boy and a girl, they keep me busy", "i have two little ones, so the house is never quiet"], "i just put my two kids to bed", None),
        ("my wife is a dentist.", ["my wife is a dentist, so i floss a lot", "it is me and my wife, she is a dentist"], None, None),
        ("my grandmother taught me to sew.", ["i am really close with my grandmother, she taught me to sew", "my grandmother is my best friend, she taught me to sew when i was little"], None, None),
        ("i live with my parents.", ["i still live with my parents, which has its ups and downs", "i live with my parents for now, saving money"], None, None),
        ("i have a twin sister.", ["i have a twin sister, people mix us up all the time", "i have a twin sister, we talk every day"], None, None),
    ],
    "place": [
        ("i live in a small town in ohio.", ["i live in a small town in ohio, everybody knows everybody", "ohio, a tiny town with one stoplight"], None, None),
        ("i grew up on a farm.", ["i grew up on a farm, and i still live close to it", "i am a farm kid, i grew up with cows and corn fields"], None, None),
        ("i live in a tiny apartment in the city.", ["i live in a tiny apartment in the city, it is loud but i love it", "the city, in an apartment the size of a closet"], None, None),
        ("i moved here from texas.", ["i am from texas originally, i moved here a few years ago", "texas, but i moved away for work"], None, None),
        ("i live near the beach.", ["i live near the beach, i can hear the waves at night", "right by the beach, it is as nice as it sounds"], "i just got back from a walk on the beach", None),
        ("i live in the mountains.", ["i live up in the mountains, lots of snow in winter", "the mountains, it is quiet and beautiful up here"], None, None),
    ],
    "music": [
        ("i play the guitar.", ["i love music, i play the guitar every day", "i play the guitar, so mostly acoustic stuff"], "i am practicing a new song on my guitar", None),
        ("i love country music.", ["i love country music, the older the better", "country, all day long"], None, None),
        ("i sing in a church choir.", ["i sing in a choir, we practice every thursday", "i sing in a choir at church, so a lot of old hymns"], "i just got home from choir practice", None),
        ("i listen to jazz while i work.", ["i listen to jazz all day, it helps me focus", "mostly jazz, i have it on while i work"], None, None),
        ("i play drums in a garage band.", ["i play drums in a garage band, we are loud but not very good", "i am a drummer in a little band with my friends"], "i just finished band practice, my ears are ringing", None),
        ("i am learning the piano.", ["i am learning the piano, i take lessons once a week", "i just started piano lessons, so mostly scales right now"], "i am practicing piano scales", None),
    ],
    "sports": [
        ("i run marathons.", ["i run marathons, i have done six so far", "i am a runner, i do a couple of marathons a year"], "i just finished a long run", None),
        ("i am a huge baseball fan.", ["i am a huge baseball fan, i never miss a game", "not really, but i am a huge baseball fan, i watch every game i can"], "i am watching the baseball game", None),
        ("i play soccer on sundays.", ["i play soccer every sunday with some friends", "i play in a sunday soccer league, it is fun"], None, None),
        ("i swim every morning.", ["i swim every morning before work", "i swim laps every morning at the pool"], None, None),
        ("i do yoga.", ["i do yoga a few times a week, it helps my back", "yoga, mostly, it keeps me calm"], "i just got back from a yoga class", None),
        ("i coach my son's basketball team.", ["i coach my son's basketball team, they are eight years old", "i coach kids basketball, my son is on the team"], "i just got back from coaching basketball practice", None),
        ("i love to ski.", ["i love to ski, i go every winter", "skiing is my favorite thing, i wait all year for snow"], None, None),
    ],
    "travel": [
        ("i have been to twelve countries.", ["i travel whenever i can, twelve countries and counting", "yes, i have been to twelve countries so far"], None, None),
        ("i am afraid of flying.", ["i am afraid of flying, so i do not travel much", "not really, i am afraid of flying, so i stay close to home"], None, ["oh no, that is too bad.", "ha, i understand, flying can be scary."]),
        ("i want to visit japan.", ["i have not been many places, but i really want to visit japan", "i am saving up to go to japan someday"], None, None),
        ("i spent last summer in italy.", ["i went to italy last summer and i still think about it", "i try to, i spent last summer in italy"], None, None),
        ("i go camping every summer.", ["i go camping every summer, that is my kind of travel", "mostly camping, i go every summer"], "i am packing for a camping trip", None),
    ],
    "media": [
        ("i read a book every week.", ["i read a book every week, mostly mysteries", "mostly reading, i get through a book a week"], "i am reading in bed", None),
        ("i love scary movies.", ["i love scary movies, the scarier the better", "scary movies, i watch one every friday night"], "i am about to watch a scary movie", None),
        ("i watch cooking shows.", ["i watch a lot of cooking shows, even though i can not cook", "mostly cooking shows, they relax me"], "i am watching a cooking show", None),
        ("my favorite book is the hobbit.", ["i reread the hobbit every year, it is my favorite book", "reading, mostly. my favorite is the hobbit, i have read it ten times"], None, None),
        ("i listen to podcasts about history.", ["i listen to podcasts about history when i drive", "mostly history podcasts, i listen to them all the time"], "i am listening to a history podcast", None),
    ],
    "dream": [
        ("i want to open my own restaurant.", ["i want to open my own restaurant someday", "my dream is to open a little restaurant"], None, None),
        ("i hope to write a novel someday.", ["i hope to write a novel someday, i have a few chapters done", "i want to write a book, i have been working on one for years"], "i am trying to write a chapter of my novel", None),
        ("i am saving up to buy a boat.", ["i am saving up to buy a boat and live on the water", "buying a boat, i am saving every penny"], None, None),
        ("i want to learn to fly a plane.", ["i want to learn to fly a plane, i start lessons next year", "flying lessons, i have always wanted to be a pilot"], None, None),
    ],
    "misc": [
        ("i am afraid of heights.", ["i am really afraid of heights, even ladders scare me", "i am terrified of heights, i will not even ride a ferris wheel"], None, ["ha, i understand, me too a little.", "oh no, that must make some things hard."]),
        ("i drive an old red pickup truck.", ["i drive an old red pickup truck that is older than me", "my car is an old red pickup, i love it"], None, None),
        ("i am left handed.", ["i am left handed, and scissors still hate me", "i am a lefty, which nobody ever guesses"], None, None),
        ("i wake up at five every morning.", ["i wake up at five every morning, even on weekends", "i am up at five every day, no alarm needed"], None, None),
        ("i have never seen the ocean.", ["i have never seen the ocean, believe it or not", "i have never been to the ocean, it is on my list"], None, ["really? you have to go someday.", "oh wow, i hope you get to see it."]),
        ("i do not own a tv.", ["i do not own a tv, people think that is weird", "i have never owned a tv, i just read instead"], None, None),
    ],
}

# Long persona facts (used only by the "long persona" rows).
LONG_FACTS = {
    "job": ("i spent ten years working on fishing boats off the coast of alaska before i settled down and opened a hardware store.",
            ["i used to work on fishing boats up in alaska for about ten years, and now i run a little hardware store"], "i am counting nails at my hardware store"),
    "family": ("i am the oldest of seven kids, so i basically helped raise my younger brothers and sisters while my parents worked.",
               ["i am the oldest of seven, so i pretty much helped raise my brothers and sisters"], None),
    "place": ("i grew up in a tiny mountain town where everyone knew each other and the nearest grocery store was an hour away.",
              ["i grew up in a tiny mountain town, the nearest grocery store was an hour away"], None),
    "hobby": ("on weekends i restore old wooden sailboats with my best friend in a barn we rent from a farmer down the road.",
              ["i restore old wooden sailboats with my best friend, we rent a barn for it"], "i am varnishing an old sailboat in the barn"),
    "music": ("i have played the cello since i was six years old and i still practice for an hour every single evening.",
              ["i have played the cello since i was six, i still practice every evening"], "i am practicing the cello, like every evening"),
    "pets": ("i share my house with three rescue greyhounds, a grumpy old cat and a parrot who only knows how to say goodbye.",
             ["i have three rescue greyhounds, a grumpy cat and a parrot who only says goodbye"], "i am feeding my three greyhounds"),
    "food": ("i am trying to cook a recipe from every country in the world, and so far i have made it through about forty of them.",
             ["i am cooking a recipe from every country in the world, i am at about forty"], "i am cooking a stew from my fortieth country"),
    "travel": ("i once drove across the entire country in an old van with no radio, and i still think it was the best summer of my life.",
               ["i once drove across the whole country in an old van with no radio, best summer ever"], None),
    "dream": ("someday i want to buy a small piece of land by the sea, build a cabin with my own hands and grow most of my own food.",
              ["someday i want to buy land by the sea and build a cabin with my own hands"], None),
    "sports": ("i ran cross country in college and i still get up before sunrise three days a week to run along the river trail.",
               ["i ran cross country in college, and i still run by the river three mornings a week"], "i just got back from a run along the river"),
}

# Facts with non-ascii text (used only by designated rows).
NONASCII_FACTS = {
    "place": ("i grew up in são paulo.", ["i grew up in são paulo, but now i live in a quiet suburb", "i am from são paulo originally, so no city ever feels too big to me"], None, None),
    "food": ("my favorite dessert is crème brûlée.", ["i like almost everything, but crème brûlée is my weakness", "desserts, especially crème brûlée, i order it everywhere"], None, None),
    "job": ("i work as a barista at a little café.", ["i am a barista at a little café downtown", "i make coffee at a café, so i am up very early"], "i just finished my shift at the café", None),
}

# Long replies (60-120 words) for the "long reference" rows, keyed by fact.
LONG_REPLIES = {
    "i run marathons.": "oh, that is a big question for me, because running is pretty much my whole life outside of work. i run marathons, usually two or three a year, and i have been doing it since my late twenties. the training is the hard part, lots of early mornings and long runs on sunday when everyone else is still asleep. but crossing the finish line never gets old, even when my legs are screaming at me. i am signed up for another one in the fall. do you run at all?",
    "i own a small bakery.": "well, i own a small bakery on the corner of main street, so my days start really early. i am usually there by four to get the bread going, then the pastries, and by the time we open at seven the whole block smells like cinnamon. it is hard work and the hours are rough, but i love seeing the same regulars every morning and knowing their orders by heart. my favorite thing to make is sourdough, it never comes out exactly the same twice. what about you?",
    "i have two dogs.": "yes, i have two dogs, and honestly they run my life. the big one is a shepherd mix who thinks he is a lap dog, and the little one is a terrier who is scared of absolutely everything, including leaves. i adopted them both from the same shelter about three years apart. we go on long walks every morning and every evening, rain or shine, so i guess they keep me in shape too. do you have any pets at home?",
    "i want to open my own restaurant.": "my big dream is to open my own restaurant someday. nothing fancy, just a small place with maybe ten tables, a short menu that changes with the seasons, and food that reminds people of their grandmother's kitchen. i have been saving for a few years, and i take cooking classes on the weekends to get better. the scary part is the money, most new restaurants close in the first year, but i think i would regret it forever if i never tried. what is your big dream?",
}

# Long first-person stories the other speaker tells (300-600 chars with the question).
LONG_STORIES = [
    "so today was a whole adventure. i was supposed to drive my cousin to the airport at six in the morning, but my car would not start, so we called a cab, and the cab driver got lost twice because the road by the river is closed for construction. we made it with ten minutes to spare, and then on the way home i stopped for breakfast and realized i had left my wallet on the kitchen counter. the waitress was really nice about it and let me come back later to pay.",
    "i have to tell someone this. my neighbor has been building something in his backyard for months, and none of us could figure out what it was. first we thought it was a shed, then a chicken coop, then maybe a tiny house. yesterday he finally finished it and it turns out it is a full size pirate ship for his grandkids, with a plank, a steering wheel and a little flag. the whole street came out to look at it.",
    "sorry if i seem distracted, it has been a long week. my boss moved our big deadline up by two weeks, my landlord decided this was the perfect time to repaint every hallway in the building, and my sister is staying with me while her apartment gets fixed after a pipe burst. i love her, but she wakes up at five and sings in the shower, so i have not slept past six in days.",
    "i just got back from the longest grocery trip of my life. i only needed milk and eggs, but the store had moved every single aisle around, so i wandered for twenty minutes, ran into my old math teacher, talked with her about her garden for half an hour, and somehow walked out with a new frying pan, three kinds of cheese and a plant i do not know how to keep alive. i still forgot the eggs, of course.",
]

# Broad questions per category; any fact of the category answers them.
QUESTIONS = {
    "job": ["what do you do for a living?", "what do you do for work?", "what keeps you busy during the week?"],
    "pets": ["do you have any pets?", "are you an animal person?", "any pets at your place?"],
    "hobby": ["what do you like to do for fun?", "do you have any hobbies?", "what do you do in your free time?"],
    "food": ["what kind of food do you like?", "are you a big foodie?", "what is your favorite thing to eat?"],
    "family": ["do you have a big family?", "tell me about your family.", "what is your family like?"],
    "place": ["where are you from?", "where do you live?", "what is it like where you live?"],
    "music": ["what kind of music do you like?", "are you into music?", "what have you been listening to lately?"],
    "sports": ["do you play any sports?", "are you into sports?", "are you a sports person?"],
    "travel": ["do you like to travel?", "do you travel much?", "are you much of a traveler?"],
    "media": ["read or watch anything good lately?", "are you more into books or movies?", "what do you do to relax at night?"],
    "dream": ["what is something you want to do someday?", "any big plans for the future?", "what is on your bucket list?"],
    "misc": ["tell me something random about yourself.", "what is something most people do not know about you?", "what is a weird fact about you?"],
}

# The other speaker's own answers to those questions (when b asks back).
A_OWN = {
    "job": ["i work at the post office, so i walk a lot.", "i am an accountant, and tax season is brutal.", "i just started at a coffee shop downtown."],
    "pets": ["i have a lazy old cat named pickles.", "no pets right now, my apartment does not allow them.", "just a goldfish, but he has a big personality."],
    "hobby": ["i have been trying to learn to juggle.", "mostly jigsaw puzzles, i know, very exciting.", "i like to fish when the weather is nice."],
    "food": ["i could eat pasta every day.", "i love anything with cheese on it.", "i am a big fan of breakfast food, even for dinner."],
    "family": ["i have two little sisters, both in college.", "it is just me and my mom, we are close.", "i have a big loud family, we see each other every sunday."],
    "place": ["i live in a small town by a lake.", "i am in a big city, it is loud but fun.", "i live in oregon, so it rains a lot."],
    "music": ["i mostly listen to pop, nothing fancy.", "i have been learning the ukulele.", "i am into old soul records."],
    "sports": ["i play basketball with friends on weekends.", "not really, but i like to watch football.", "i just signed up for my first 5k."],
    "travel": ["i love it, i just got back from canada.", "i have never been on a plane, believe it or not.", "i am planning a road trip down the coast."],
    "media": ["i just finished a great mystery novel.", "movies, definitely. i love comedies.", "i have been watching a show about space."],
    "dream": ["i want to move to the countryside someday.", "i am saving up for a trip to iceland.", "i would love to learn three languages."],
    "misc": ["i can not whistle, no matter how hard i try.", "i have never broken a bone.", "i can name every state capital."],
}

# Things the other speaker shares unprompted: (statement, b's curious reply, a's answer).
A_SHARE = [
    ("i just adopted a kitten last week.", "aww, what did you name her?", "noodle. she is already a menace."),
    ("my dog ate my sandwich today.", "haha, what kind of dog is he?", "a beagle, so i should have known."),
    ("i have a turtle that is older than me.", "wait, really? how old is he?", "about forty, he was my dad's."),
    ("i built a birdhouse this weekend.", "that is cool, did any birds move in?", "not yet, but a squirrel checked it out."),
    ("i started doing jigsaw puzzles again.", "nice, how many pieces?", "a thousand. it has taken over my kitchen table."),
    ("i made soup from scratch tonight.", "yum, what kind?", "chicken noodle, my mom's recipe."),
    ("i am trying to eat less sugar.", "how is that going?", "terribly, i had a donut this morning."),
    ("i ate at a new ramen place today.", "ooh, was it good?", "so good, i want to go back tomorrow."),
    ("my sister is getting married next month.", "congrats to her! are you in the wedding?", "yes, i am the maid of honor, so i am a little stressed."),
    ("my parents are visiting this weekend.", "that is nice, do they live far?", "about six hours away by car."),
    ("i just moved to a new city.", "oh, how do you like it so far?", "it is big and loud, but i am getting used to it."),
    ("it has been raining here all week.", "ugh, where do you live?", "in oregon, so i should be used to it."),
    ("i went to a concert last night.", "fun! who did you see?", "a local band, they were really good."),
    ("my team lost again last night.", "oh no, which team?", "our hockey team, they always lose."),
    ("i started going to the gym.", "how do you like it?", "i am sore all the time, but i feel better."),
    ("i am planning a road trip.", "oh fun, where to?", "down the coast, no real plan yet."),
    ("i stayed up way too late reading last night.", "ha, what book?", "a mystery novel, i had to know who did it."),
    ("i have watched the same movie ten times this year.", "which one?", "a silly comedy from the nineties, it never gets old."),
    ("i lost my keys three times this week.", "oh no, where did they turn up?", "once in the fridge, do not ask."),
    ("i have been awake since four this morning.", "why so early?", "my neighbor's rooster. every single day."),
    ("i finally fixed the leaky faucet in my kitchen.", "nice, did you do it yourself?", "yes, with a lot of help from online videos."),
    ("i got a flat tire on the way to work today.", "oh no, were you late?", "only a little, my boss was nice about it."),
]

REACT = {
    "job": ["that sounds like hard work.", "oh wow, that must keep you busy.", "that is a cool job."],
    "pets": ["aww, that is so cute.", "i love animals.", "ha, that sounds fun."],
    "hobby": ["that sounds relaxing.", "oh cool, i have always wanted to try that.", "nice, that is a great hobby."],
    "food": ["yum, now i am hungry.", "ha, good choice.", "that sounds delicious."],
    "family": ["that is sweet.", "family is important.", "aww, that is nice."],
    "place": ["oh, i have heard it is nice there.", "that sounds like a nice place to live.", "cool, i have never been."],
    "music": ["nice, music is the best.", "oh cool, that is awesome.", "ha, i love that."],
    "sports": ["wow, that is impressive.", "nice, you must be in good shape.", "that is awesome."],
    "travel": ["that sounds amazing.", "wow, lucky you.", "i would love to do that."],
    "media": ["oh nice, i need some recommendations.", "cool, i like that too.", "ha, that sounds fun."],
    "dream": ["that is a great goal.", "i hope you get to do it.", "that would be awesome."],
    "misc": ["ha, that is interesting.", "oh wow, i did not expect that.", "haha, fair enough."],
}

# Greetings of the other speaker: (text, kind) where kind picks b's opener.
GREETINGS = [
    ("hi, how are you today?", "how"), ("hello! how is your evening going?", "how"),
    ("hey there, how are you?", "how"), ("hi! how is your day going?", "how"),
    ("hello, how are you doing tonight?", "how"), ("good morning! how are you?", "how"),
    ("hey! what are you up to?", "what"), ("hi there, what are you doing tonight?", "what"),
]
GREET_OPEN = ["hi there!", "hello!", "hey!", "hi, nice to meet you.", "hello, how are you?"]
B_OPEN = {
    "how": ["hi! i am good, thanks.", "hey! doing well, thank you.", "hello! pretty good.", "hi there! not bad at all.", "i am great, thanks for asking."],
    "what": ["not much, honestly.", "hi! nothing special.", "hey! just relaxing."],
}
# b's question back after a greeting (by greeting kind), with the other
# speaker's possible answers.
HOW_ANS = ["i am doing well, thanks.", "pretty good, can not complain.", "i am good, a little tired.", "not bad, just a long day."]
WHAT_ANS = ["just relaxing after a long day.", "not much, watching tv.", "just cooking dinner.", "not much, just got home from work."]
GREET_BACK = {
    "how": [("how are you?", HOW_ANS), ("how about you?", HOW_ANS), ("how is your day going?", ["pretty good so far.", "long, but better now.", "not bad at all, thanks."])],
    "what": [("how about you?", WHAT_ANS), ("what about you?", WHAT_ANS)],
}

# Things the other speaker volunteers before asking "what about you?",
# with a fitting acknowledgement from b.
A_VOL = {
    "job": [("i just started a new job at a coffee shop.", "oh nice, congrats."), ("i work at the post office, so i walk a lot.", "ha, that is good exercise.")],
    "pets": [("i have a lazy old cat named pickles.", "ha, i love that name."), ("i have a goldfish with a big personality.", "haha, a goldfish with personality.")],
    "hobby": [("i have been trying to learn to juggle.", "ha, that is a fun one."), ("i like to fish when the weather is nice.", "oh nice, that sounds peaceful.")],
    "food": [("i could eat pasta every day.", "ha, same here."), ("i love anything with cheese on it.", "ha, who does not?")],
    "family": [("i have two little sisters, both in college.", "oh nice."), ("i have a big loud family, we see each other every sunday.", "that sounds fun.")],
    "place": [("i live in a small town by a lake.", "oh, that sounds peaceful."), ("i live in oregon, so it rains a lot.", "ha, i have heard that.")],
    "music": [("i have been learning the ukulele.", "oh fun."), ("i am really into old soul records.", "oh nice, good taste.")],
    "sports": [("i play basketball with friends on weekends.", "oh nice."), ("i just signed up for my first 5k.", "good luck with that!")],
    "travel": [("i just got back from a trip to canada.", "oh nice, welcome back."), ("i am planning a road trip down the coast.", "that sounds fun.")],
    "media": [("i just finished a great mystery novel.", "oh nice."), ("i have been watching a show about space.", "oh cool.")],
    "dream": [("i want to move to the countryside someday.", "oh, that sounds nice."), ("i am saving up for a trip to iceland.", "oh wow, that would be amazing.")],
    "misc": [("i can not whistle, no matter how hard i try.", "haha, really?"), ("i can name every state capital.", "wow, that is impressive.")],
}
B_LEAD = ["", "", "", "well, ", "oh, ", "hmm, ", "honestly, "]
B_QBACK = ["how about you?", "what about you?"]
A_TRANS = ["", "", "so ", "anyway, "]
CONT_OPEN = ["oh, and", "also,", "anyway,", "sorry, i got distracted.", "oh, i forgot to mention,"]


def sent(s):
    """Ensure a sentence ends with punctuation."""
    s = s.strip()
    return s if s[-1] in ".?!" else s + "."


def join(*parts):
    return " ".join(p.strip() for p in parts if p and p.strip())


def is_fact_turn(kind):
    return kind in ("greet_ask", "ask")


def count_needs(kinds, n):
    """Persona facts used by b: one per answered question, plus one for the
    reference when it does not answer a question (even n, or n == 1 after a
    plain greeting)."""
    extra = n % 2 == 0 or kinds == ["greet_plain"]
    return sum(map(is_fact_turn, kinds)) + (1 if extra else 0), extra


def make_skeleton(rng, n, final_must_ask):
    """Kinds of the other speaker's turns: greet_plain/greet_ask/ask/share.
    A "share" (a statement b then asks about) is never last and never twice in a row."""
    m = (n + 1) // 2
    while True:
        kinds = ["greet_ask" if rng.random() < 0.35 else "greet_plain"]
        for i in range(1, m):
            if i < m - 1 and kinds[-1] != "share" and rng.random() < 0.3:
                kinds.append("share")
            else:
                kinds.append("ask")
        if final_must_ask and not is_fact_turn(kinds[-1]):
            continue
        needs, extra = count_needs(kinds, n)
        if needs <= 5:
            return kinds, needs, extra


def build_row(rng, n, special):
    story = None
    if special and special.startswith("long_story:"):
        story = LONG_STORIES[int(special.split(":")[1])]
    final_must_ask = story is not None or special in ("long_ref", "nonascii_fact")
    kinds, needs, extra = make_skeleton(rng, n, final_must_ask)

    # --- persona: one fact per category ---
    forced = None  # (category, fact) that the last question targets
    if special == "long_ref":
        key = rng.choice(sorted(LONG_REPLIES))
        forced = next((c, f) for c, fl in FACTS.items() for f in fl if f[0] == key)
    elif special == "nonascii_fact":
        c = rng.choice(sorted(NONASCII_FACTS))
        forced = (c, NONASCII_FACTS[c])
    if special == "long_persona":
        p = max(needs, rng.randint(5, 6))
        cats = rng.sample(sorted(LONG_FACTS), p)
        facts = {}
        for i, c in enumerate(cats):
            if i < p - 1 or rng.random() < 0.5:
                fact, says, doing = LONG_FACTS[c]
                facts[c] = (fact, says, doing, None)
            else:
                facts[c] = rng.choice(FACTS[c])
    else:
        p = max(needs, rng.randint(3, 5))
        pool = sorted(FACTS)
        if forced:
            pool.remove(forced[0])
        cats = rng.sample(pool, p - (1 if forced else 0))
        facts = {c: rng.choice(FACTS[c]) for c in cats}
        if forced:
            facts[forced[0]] = forced[1]
            cats.append(forced[0])

    # Categories b talks about, in order; a forced one goes to the last question.
    order = [c for c in cats if not (forced and c == forced[0])]
    rng.shuffle(order)
    if forced:
        order.append(forced[0])
    targets = order[len(order) - needs:]
    ask_idx = [i for i, k in enumerate(kinds) if is_fact_turn(k)]
    target_of = {i: targets[j] for j, i in enumerate(ask_idx)}
    extra_target = targets[-1] if extra else None
    spare = [c for c in cats if c not in targets]

    used_a = set()

    def pick_new(options, key=lambda o: o):
        opts = [o for o in options if key(o) not in used_a]
        o = rng.choice(opts or options)
        used_a.add(key(o))
        return o

    def b_fact(c, ack, asked_q, allow_q):
        fact = facts[c]
        parts = []
        if ack and rng.random() < 0.7:
            parts.append(ack)
        parts.append(sent(rng.choice(B_LEAD) + rng.choice(fact[1])))
        qback = None
        # no question back when the other speaker already told about themselves
        if allow_q and not ack and rng.random() < 0.5:
            qback = rng.choice(B_QBACK + [q for q in QUESTIONS[c] if q != asked_q])
            parts.append(qback)
        return join(*parts), qback

    def doing_text(doing, kind):
        if kind == "what" and rng.random() < 0.6:
            if doing.startswith("i am "):
                return "just " + doing[len("i am "):]
            if doing.startswith("i just "):
                return doing[len("i "):]
        return doing

    def b_greet_reply(kind, greeting, use_cat, allow_q):
        parts = [rng.choice(B_OPEN[kind])]
        if use_cat:
            fact = facts[use_cat]
            if fact[2] and rng.random() < 0.85:
                parts.append(sent(doing_text(fact[2], kind)))
            else:
                parts.append(sent(fact[1][0]))
        q = None
        if allow_q:
            # do not echo the greeting's own question
            q = rng.choice([g for g in GREET_BACK[kind] if g[0][:-1] not in greeting])
            parts.append(q[0])
        return join(*parts), q

    def react(c):
        return rng.choice(facts[c][3] or REACT[c])

    turns = []
    prev_b = None   # what persona b's last turn was, for the other speaker's reply
    a_state = None  # what the other speaker's last turn was, for b's reply
    reference = None
    share_pool = list(range(len(A_SHARE)))
    rng.shuffle(share_pool)
    ai = 0
    for pos in range(n + 1):
        if pos % 2 == 0:  # the other speaker
            if pos == n:
                break  # even n: the reference is b's follow-up, below
            kind = kinds[ai]
            final_a = ai == len(kinds) - 1
            if kind == "greet_plain":
                text, gk = rng.choice(GREETINGS)
                if special == "emoji_dialogue":
                    text = "👋 " + text
                turns.append(text)
                a_state = ("greet", gk, text)
            elif kind == "greet_ask":
                c = target_of[ai]
                q = rng.choice(QUESTIONS[c])
                emoji = "😊" if special == "emoji_dialogue" else ""
                turns.append(join(rng.choice(GREET_OPEN), emoji, q))
                a_state = ("ask", c, q, None)
            else:
                pre = []
                if prev_b[0] == "greet":
                    _, q, fcat = prev_b
                    if q:
                        pre.append(rng.choice(q[1]))
                    if fcat and rng.random() < 0.5:
                        pre.append(react(fcat))
                elif prev_b[0] == "fact":
                    _, pc, qback = prev_b
                    if not qback or rng.random() < 0.5:
                        pre.append(react(pc))
                    if qback:
                        pre.append(pick_new(A_OWN[pc]))
                else:  # b asked about what the other speaker shared
                    pre.append(A_SHARE[prev_b[1]][2])
                if kind == "share":
                    si = share_pool.pop()
                    turns.append(join(*pre, A_SHARE[si][0]))
                    a_state = ("share", si)
                else:
                    c = target_of[ai]
                    q = rng.choice(QUESTIONS[c])
                    ack = None
                    if story and final_a:
                        text = join(*pre, story, "anyway, enough about me.", q)
                    elif len(pre) <= 1 and rng.random() < 0.3:
                        vol, ack = pick_new(A_VOL[c], key=lambda o: o[0])
                        if rng.random() < 0.5:
                            q = rng.choice(["what about you?", "how about you?"])
                        text = join(*pre, vol, q)
                    else:
                        text = join(*pre, rng.choice(A_TRANS) + q)
                    turns.append(text)
                    a_state = ("ask", c, q, ack)
            ai += 1
        else:  # persona b
            is_ref = pos == n
            # an even-length dialogue ends with b, whose last turn asks nothing
            allow_q = is_ref or pos != n - 1
            if a_state[0] == "greet":
                use = None
                if is_ref:
                    use = extra_target  # n == 1 after a plain greeting
                elif spare and rng.random() < 0.6:
                    # prefer a fact with something b is doing right now
                    doing = [c for c in spare if facts[c][2]]
                    if doing or rng.random() < 0.4:
                        use = rng.choice(doing or spare)
                        spare.remove(use)
                text, q = b_greet_reply(a_state[1], a_state[2], use, allow_q)
                prev_b = ("greet", q, use)
            elif a_state[0] == "ask":
                _, c, q, ack = a_state
                if is_ref and special == "long_ref":
                    text, qback = LONG_REPLIES[facts[c][0]], None
                else:
                    text, qback = b_fact(c, ack, q, allow_q)
                if pos == 1:  # answering a greeting that asked a question
                    text = join(rng.choice(["hi!", "hello!", "hey there!"]), text)
                prev_b = ("fact", c, qback)
            else:
                si = a_state[1]
                text = A_SHARE[si][1]
                prev_b = ("curious", si)
            if is_ref:
                reference = text
            else:
                turns.append(text)

    if reference is None:
        # even n: b sends a follow-up message about another persona fact
        c = extra_target
        parts = [rng.choice(CONT_OPEN), sent(facts[c][1][0])]
        if rng.random() < 0.6:
            parts.append(rng.choice(B_QBACK + QUESTIONS[c]))
        reference = join(*parts)
    if special == "emoji_reference":
        reference = reference + " 😄"

    persona = [facts[c][0] for c in cats]
    rng.shuffle(persona)
    return {"persona_b": persona, "dialogue": turns, "reference": reference}


def make_rows():
    rng = random.Random(SEED)
    lengths = [n for n in sorted(LENGTH_COUNTS) for _ in range(LENGTH_COUNTS[n])]
    rng.shuffle(lengths)
    specials = [None] * N_ROWS
    odd3 = [i for i, n in enumerate(lengths) if n % 2 == 1 and n >= 3]
    rng.shuffle(odd3)
    for k, i in enumerate(odd3[:4]):
        specials[i] = f"long_story:{k}"  # a 300-600 char turn of the other speaker
    for i in odd3[4:7]:
        specials[i] = "long_ref"         # a 60-120 word reference
    for i in odd3[7:10]:
        specials[i] = "nonascii_fact"    # accented persona fact the reference uses
    rest = [i for i in range(N_ROWS) if specials[i] is None]
    rng.shuffle(rest)
    for i in rest[:3]:
        specials[i] = "long_persona"     # 5-6 long persona facts
    specials[rest[3]] = "emoji_dialogue"
    specials[rest[4]] = "emoji_reference"

    rows = []
    seen = set()
    for i, n in enumerate(lengths):
        while True:
            r = build_row(rng, n, specials[i])
            key = json.dumps(r, sort_keys=True)
            if key not in seen:
                seen.add(key)
                break
        rows.append({"conv_id": f"sample-{i + 1:04d}", **r})
    return rows


def check(rows):
    ids = set()
    for r in rows:
        assert list(r) == ["conv_id", "persona_b", "dialogue", "reference"], r
        assert r["conv_id"] not in ids
        ids.add(r["conv_id"])
        assert 3 <= len(r["persona_b"]) <= 6, r
        assert len(set(r["persona_b"])) == len(r["persona_b"]), r
        assert 1 <= len(r["dialogue"]) <= 9, r
        assert r["reference"] not in r["dialogue"], r
        for s in [r["conv_id"], r["reference"], *r["persona_b"], *r["dialogue"]]:
            assert isinstance(s, str) and s and s == s.strip() and "  " not in s, repr(s)
            assert s == s.lower(), repr(s)
    assert len(rows) == N_ROWS
    counts = {}
    for r in rows:
        counts[len(r["dialogue"])] = counts.get(len(r["dialogue"]), 0) + 1
    assert counts == LENGTH_COUNTS, counts


SCHEMA = pa.schema([
    pa.field("conv_id", pa.string()),
    pa.field("persona_b", pa.list_(pa.string())),
    pa.field("dialogue", pa.list_(pa.string())),
    pa.field("reference", pa.string()),
])


def main():
    rows = make_rows()
    check(rows)
    with open(JSONL_PATH, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, PARQUET_PATH, compression="snappy",
                   use_dictionary=False, write_statistics=True)
    # read back and compare
    back = pq.read_table(PARQUET_PATH).to_pylist()
    with open(JSONL_PATH, encoding="utf-8") as f:
        from_jsonl = [json.loads(line) for line in f]
    assert back == from_jsonl == rows, "parquet/jsonl mismatch"
    print(f"wrote {len(rows)} rows to {JSONL_PATH.name} and {PARQUET_PATH.name}")


if __name__ == "__main__":
    main()
